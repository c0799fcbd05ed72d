//! `thaw serve`'s router in this test process on 127.0.0.1:<free port>, over a home of
//! its own: the real server and engine, with the engine at hand for what a test checks
//! behind the API (keys, leftovers).

use std::path::PathBuf;

use thaw_api::{Client, ClientError, Fault};
use thaw_platform::{Engine, Paths};
use thaw_server::ServerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::Home;

/// A server on 127.0.0.1:<free port> over its own THAW_HOME.
pub struct Server {
    pub home: Home,
    pub url: String,
    pub engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<thaw_server::Result<()>>>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Server {
        let home = Home::new();
        let cache: PathBuf = std::env::var_os("THAW_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/thaw"));
        let engine = Engine::open(Paths::new(home.path(), cache))
            .await
            .expect("open engine");
        let mut cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        tune(&mut cfg);
        let listener = thaw_server::bind(&cfg).await.expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(thaw_server::serve_on(
            listener,
            engine.clone(),
            cfg,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            home,
            url,
            engine,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A new API key's secret.
    pub fn key(&self, name: &str, max_sandboxes: u32) -> String {
        self.engine
            .create_key(name, max_sandboxes, false)
            .expect("key")
            .1
    }

    pub fn client(&self, secret: &str) -> Client {
        Client::new(&self.url, Some(secret.to_string())).expect("client")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Stops the server (it waits for in-flight calls) and checks nothing leaked.
    pub async fn finish(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await
                .expect("server task")
                .expect("server ended with an error");
        }
        self.home.assert_clean();
    }
}

/// Status, code, message and fault of an API error; panics on any other error.
pub fn api_error(e: &ClientError) -> (u16, &str, &str, Fault) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            fault,
            ..
        } => (*status, code, message, *fault),
        other => panic!("expected an API error, got {other:?}"),
    }
}
