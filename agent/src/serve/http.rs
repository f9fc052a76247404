//! The agent's small HTTP endpoints (health, health-check NodePorts, metrics): HTTP/1.1 on
//! hyper, one short text or JSON reply per request.

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A reply, before it becomes an HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Reply {
    #[must_use]
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: vec![("X-Content-Type-Options", "nosniff".to_owned())],
            body,
        }
    }

    #[must_use]
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    #[must_use]
    pub fn not_found() -> Self {
        Self::text(
            404,
            "text/plain; charset=utf-8",
            "404 page not found\n".into(),
        )
    }
}

/// What answers a request: its path (without the query) to a reply.
pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// Binds `addr` (failing at once, with the address in the error, if it is taken).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Answers every connection on `listener` with `handler`, until dropped.
pub async fn serve(listener: TcpListener, handler: Handler) -> Infallible {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("accepting an HTTP connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let reply = handler(request.uri().path());
                async move { Ok::<_, Infallible>(response(reply)) }
            });
            // A client that goes away mid-request is no concern of the agent's.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(reply.status)
        .header("Content-Type", reply.content_type);
    for (name, value) in reply.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from(reply.body)))
        .expect("status and headers are valid")
}
