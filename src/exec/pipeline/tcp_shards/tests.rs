use super::*;
use crate::exec::backend::CpuBackend;
use crate::exec::pipeline::engine::CpuEngine;
use crate::exec::pipeline::reduce_point::tests::copies;
use crate::exec::pipeline::reduce_point::{gather_shards, scatter_sums};

/// 9 elements over 3 replicas: 0..3 of the first tensor, 3..5 and 0..1, 1..4.
fn shards() -> Shards {
    vec![
        vec![(0, 0, 0..3)],
        vec![(0, 0, 3..5), (0, 1, 0..1)],
        vec![(0, 1, 1..4)],
    ]
}

/// Host access for each of `local`'s copies.
fn hosts(local: &[u32]) -> Vec<Host> {
    vec![Host; local.len()]
}

fn bits(copy: &ChunkGrads<Tensor>) -> Vec<Vec<u32>> {
    (copy.iter().flatten())
        .map(|t| t.data().iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Replicas 0 and 2 in one process, replica 1 in another: each process's copies end as one
/// process's would, bit for bit.
fn split_like_one_process(
    one: impl Fn(&mut [ChunkGrads<Tensor>]),
    spread: impl Fn(&mut [ChunkGrads<Tensor>], &[u32], &mut BTreeMap<u32, Payload>) -> Result<()>,
    owners_sent: impl Fn(u32, &[u32]) -> Vec<u32>,
) {
    let mut whole = copies();
    one(&mut whole);
    let all = copies();
    let shards = shards();
    for local in [vec![0u32, 2], vec![1]] {
        let mut here: Vec<ChunkGrads<Tensor>> = copies()
            .into_iter()
            .enumerate()
            .filter(|(r, _)| local.contains(&(*r as u32)))
            .map(|(_, c)| c)
            .collect();
        let mut remote: BTreeMap<u32, Payload> = (0..3u32)
            .filter(|r| !local.contains(r))
            .map(|r| {
                let sent = owned_values(&Host, &all[r as usize], &shards, &owners_sent(r, &local));
                (r, Payload::new(r, sent.unwrap()))
            })
            .collect();
        spread(&mut here, &local, &mut remote).unwrap();
        for (copy, r) in here.iter().zip(&local) {
            assert_eq!(bits(copy), bits(&whole[*r as usize]), "replica {r}");
        }
    }
}

#[test]
fn scattering_over_processes_gives_one_process_bits() {
    let engine = CpuEngine {
        backend: CpuBackend::default(),
    };
    split_like_one_process(
        |all| scatter_sums(&engine, 0, all, &shards()).unwrap(),
        |here, local, remote| scatter_with(&hosts(local), here, local, remote, &shards()),
        // A replica sends what the receiving process's replicas own.
        |_, local| local.to_vec(),
    );
}

#[test]
fn gathering_over_processes_gives_one_process_bits() {
    let engine = CpuEngine {
        backend: CpuBackend::default(),
    };
    split_like_one_process(
        |all| gather_shards(&engine, 0, all, &shards()).unwrap(),
        |here, local, remote| gather_with(&hosts(local), here, local, remote, &shards()),
        // A replica sends what it owns.
        |sender, _| vec![sender],
    );
}

#[test]
fn a_payload_of_another_length_is_refused() {
    let all = copies();
    let shards = shards();
    let mut here = vec![copies().swap_remove(1)];
    // Replica 0's payload carries what replicas 1 and 2 own: more than this process reads.
    let too_long = owned_values(&Host, &all[0], &shards, &[1, 2]).unwrap();
    let short = owned_values(&Host, &all[2], &shards, &[]).unwrap();
    let mut remote = BTreeMap::from([(0, Payload::new(0, too_long)), (2, Payload::new(2, short))]);
    let err = scatter_with(&[Host], &mut here, &[1], &mut remote, &shards).unwrap_err();
    assert!(
        err.to_string()
            .contains("replica 2's payload holds too few"),
        "{err}"
    );
    let mut remote = BTreeMap::from([
        (
            0,
            Payload::new(0, owned_values(&Host, &all[0], &shards, &[1, 2]).unwrap()),
        ),
        (
            2,
            Payload::new(2, owned_values(&Host, &all[2], &shards, &[1]).unwrap()),
        ),
    ]);
    let err = scatter_with(&[Host], &mut here, &[1], &mut remote, &shards).unwrap_err();
    assert!(
        err.to_string().contains("replica 0's payload holds more"),
        "{err}"
    );
}
