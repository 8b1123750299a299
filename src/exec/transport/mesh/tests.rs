//! Ranks of one process meet, talk and part; one of another run, one that never comes,
//! one that fails, goes silent or vanishes is named in the error every wait gets.
use super::*;
use crate::exec::transport::MessageKind;

fn peers(n: usize) -> String {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = held
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    addrs.join(",")
}

fn spec(rank: u32, peers: &str, secs: u64) -> RankSpec {
    RankSpec::parse(rank, peers, Duration::from_secs(secs)).unwrap()
}

/// Connects ranks 0 and 1 of `peers` in two threads with these fingerprints.
fn pair(
    peers: &str,
    prints: [u64; 2],
) -> (Result<Mesh, TransportError>, Result<Mesh, TransportError>) {
    let one = {
        let s = spec(1, peers, 10);
        std::thread::spawn(move || Mesh::connect(&s, prints[1]))
    };
    let zero = Mesh::connect(&spec(0, peers, 10), prints[0]);
    (zero, one.join().unwrap())
}

#[test]
fn two_ranks_exchange_frames_and_part_with_goodbyes() {
    let (zero, one) = pair(&peers(2), [7, 7]);
    let (zero, one) = (zero.unwrap(), one.unwrap());
    let key = MessageKey {
        kind: MessageKind::Activation,
        mb: 1,
        chunk: 0,
    };
    let tensor = WireTensor {
        name: "h".into(),
        shape: vec![2],
        data: vec![0.5, -1.0],
        bf16: false,
    };
    let frame = Frame::Tensor {
        step: 4,
        to: 1,
        key,
        tensor: tensor.clone(),
    };
    zero.send(1, &frame).unwrap();
    let got = one
        .wait(|inbox| inbox.tensors.remove(&(4, 1, key)), &|| false)
        .unwrap();
    assert_eq!(got, Some(tensor));
    // What a transport's setup says lands under the sender's rank and the key.
    let setup = Frame::Setup {
        key: "gpus".into(),
        bytes: vec![1, 2, 3],
    };
    one.send(0, &setup).unwrap();
    let said = zero
        .wait(|inbox| inbox.setup.remove(&(1, "gpus".into())), &|| false)
        .unwrap();
    assert_eq!(said, Some(vec![1, 2, 3]));
    let closing = std::thread::spawn(move || one.close(Duration::from_secs(5)));
    zero.close(Duration::from_secs(5)).unwrap();
    closing.join().unwrap().unwrap();
}

#[test]
fn a_rank_of_another_run_is_refused_on_both_sides() {
    let (zero, one) = pair(&peers(2), [1, 2]);
    for result in [zero, one] {
        let err = result.err().expect("refused").to_string();
        assert!(err.contains("runs another job or plan"), "{err}");
    }
}

#[test]
fn a_rank_that_never_comes_is_named_after_the_deadline() {
    let peers = peers(2);
    let started = Instant::now();
    let err = Mesh::connect(&spec(1, &peers, 1), 0).err().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = err.to_string();
    assert!(
        text.starts_with("rank 1 could not reach rank 0 at 127.0.0.1:")
            && text.contains("within 1 s"),
        "{text}"
    );
    let err = Mesh::connect(&spec(0, &peers, 1), 0).err().unwrap();
    assert!(err.to_string().contains("rank 1 at"), "{err}");
    assert!(err.to_string().contains("it never connected"), "{err}");
}

#[test]
fn a_rank_that_goes_silent_is_given_up_after_the_silence() {
    let peers = peers(2);
    let zero = {
        let s = spec(0, &peers, 10);
        std::thread::spawn(move || Mesh::connect_with(&s, 5, Duration::from_secs(1)))
    };
    // Rank 1 greets as it should, then hangs: no frame, not even a heartbeat.
    let addr = peers.split(',').next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut hung = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let hello = Frame::Hello {
        rank: 1,
        ranks: 2,
        fingerprint: 5,
    };
    hello.write_to(&mut hung).unwrap();
    assert!(matches!(
        Frame::read_from(&mut hung).unwrap(),
        Frame::Hello { rank: 0, .. }
    ));
    let zero = zero.join().unwrap().unwrap();
    let started = Instant::now();
    let err = zero
        .wait(|inbox| inbox.meets.remove(&(0, 1)), &|| false)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains("nothing heard for 1 s"), "{err}");
    // The heartbeat went the other way meanwhile.
    assert_eq!(Frame::read_from(&mut hung).unwrap(), Frame::Beat);
}

/// Counts how often what `on_failure` was given has run.
fn counted(mesh: &Mesh) -> Arc<std::sync::atomic::AtomicUsize> {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    mesh.on_failure(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    runs
}

#[test]
fn a_rank_that_fails_tells_the_other_why() {
    let (zero, one) = pair(&peers(2), [9, 9]);
    let (zero, one) = (zero.unwrap(), one.unwrap());
    let (zero_hook, one_hook) = (counted(&zero), counted(&one));
    one.abort("device 1, action 4 (B0.1): out of memory");
    // The aborting rank's hooks run at once, the other's when the news arrives; once each.
    assert_eq!(one_hook.load(Ordering::SeqCst), 1);
    one.abort("again");
    assert_eq!(one_hook.load(Ordering::SeqCst), 1);
    let err = zero
        .wait(|inbox| inbox.meets.remove(&(0, 1)), &|| false)
        .unwrap_err();
    // (run by the reader thread right after it files the failure the wait saw)
    let deadline = Instant::now() + Duration::from_secs(5);
    while zero_hook.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(zero_hook.load(Ordering::SeqCst), 1);
    // One given after the failure runs at once.
    assert_eq!(counted(&zero).load(Ordering::SeqCst), 1);
    assert_eq!(
        err.to_string(),
        "rank 1 stopped: device 1, action 4 (B0.1): out of memory"
    );
    // Its link closing afterwards does not hide why it stopped.
    drop(one);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(zero.failure(), Some(err));
}

#[test]
fn a_rank_that_vanishes_fails_every_wait_of_the_other() {
    let (zero, one) = pair(&peers(2), [3, 3]);
    let (zero, one) = (zero.unwrap(), one.unwrap());
    let waiting = std::thread::spawn(move || {
        let got = zero.wait(|inbox| inbox.meets.remove(&(0, 1)), &|| false);
        (got.map(|m| m.is_some()), zero)
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(one); // no goodbye
    let (got, zero) = waiting.join().unwrap();
    let err = got.unwrap_err();
    assert!(
        matches!(&err, TransportError::PeerLost { peer: 1, reason, .. }
            if reason.contains("the process ended or was killed")),
        "{err}"
    );
    // Sending to it fails too, with the same cause.
    assert_eq!(zero.send(1, &Frame::Bye).unwrap_err(), err);
}
