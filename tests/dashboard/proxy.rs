//! A TCP relay between the browser and the server that can cut every open connection, as a
//! restarted load balancer does, so the page's event stream must reconnect.

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CuttingProxy {
    pub base: String,
    cuts: watch::Sender<u64>,
}

impl CuttingProxy {
    /// Relays 127.0.0.1:<random port> to `target` (host:port).
    pub async fn start(target: String) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (cuts, watching) = watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let mut cut = watching.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    // Either side closing, or a cut, ends both.
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        CuttingProxy { base, cuts }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Closes every connection open now; new ones are relayed as before.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}
