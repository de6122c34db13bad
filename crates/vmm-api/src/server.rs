//! The socket side: accepts connections, reads requests with hyper, answers with JSON.
//!
//! Nothing a client sends may take the server down, so every limit is enforced here rather than
//! trusted to the client: connection count, header size, body size, and how long a client may
//! take to send a request.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};
use vmm::rpc::{ActionError, ActionResult, VmmAction, VmmData, VmmHandle};

use crate::request::{self, Parsed};

/// Largest request body accepted, in bytes (the same limit as Firecracker's API server).
pub const MAX_BODY_SIZE: usize = 51200;

/// Connections served at once; more wait in the kernel's backlog. Bounds the memory and file
/// descriptors a misbehaving client can pin.
const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send a request's headers, and how long an idle keep-alive
/// connection is kept open.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send a request's body once its headers arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line and headers) accepted; bigger ones get hyper's 431.
const MAX_HEAD_SIZE: usize = 64 * 1024;

/// Pause after a failed `accept` (such as running out of file descriptors) before retrying,
/// so that a persistent error does not spin the thread.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// A server that is set up and ready to run on its own thread.
pub(crate) struct Running {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::UnixListener,
    handle: VmmHandle,
    stop: oneshot::Receiver<()>,
}

impl Running {
    /// Creates the runtime and registers the already-bound listener with it, so that every
    /// set-up error surfaces to the caller of [`crate::start`] instead of on the thread.
    pub(crate) fn new(
        listener: std::os::unix::net::UnixListener,
        handle: VmmHandle,
        stop: oneshot::Receiver<()>,
    ) -> std::io::Result<Running> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::UnixListener::from_std(listener)?
        };
        Ok(Running {
            runtime,
            listener,
            handle,
            stop,
        })
    }

    /// Serves until told to stop (or until the [`crate::ApiServer`] is dropped).
    pub(crate) fn run(self) {
        let Running {
            runtime,
            listener,
            handle,
            stop,
        } = self;
        runtime.block_on(accept_loop(listener, handle, stop));
        // Dropping the runtime here cancels the connections still open.
    }
}

/// Accepts connections and serves each on its own task.
async fn accept_loop(
    listener: tokio::net::UnixListener,
    handle: VmmHandle,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some(slot) = unless_stopped(&mut stop, slots.clone().acquire_owned()).await else {
            return;
        };
        let Ok(slot) = slot else {
            // The semaphore is never closed; treat it as a stop all the same.
            return;
        };
        let Some(accepted) = unless_stopped(&mut stop, listener.accept()).await else {
            return;
        };
        match accepted {
            Ok((stream, _)) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    serve_connection(stream, handle).await;
                    drop(slot);
                });
            }
            Err(err) => {
                tracing::warn!("API socket accept failed: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Runs `work` until it finishes (`Some`) or a stop is requested (`None`). The stop channel also
/// fires when its sender is dropped, which is what a dropped [`crate::ApiServer`] does.
async fn unless_stopped<F: Future>(stop: &mut oneshot::Receiver<()>, work: F) -> Option<F::Output> {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if Pin::new(&mut *stop).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        work.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Serves HTTP/1 requests on one connection until the client closes it or breaks the protocol.
async fn serve_connection(stream: tokio::net::UnixStream, handle: VmmHandle) {
    let service = hyper::service::service_fn(move |request| {
        let handle = handle.clone();
        async move { Ok::<_, Infallible>(respond(request, &handle).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_SIZE)
        // Clients such as `curl` or `nc -N` may shut down their sending side after the request;
        // they still expect the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        tracing::debug!("API connection ended with an error: {err}");
    }
}

/// Answers one request.
async fn respond(request: Request<Incoming>, handle: &VmmHandle) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();

    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > MAX_BODY_SIZE as u64) {
        // Answer without reading the body; the connection cannot be reused after that.
        let mut response = body_too_large();
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }

    let body = match read_body(request.into_body()).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    tracing::debug!("API request: {method} {path} ({} byte body)", body.len());

    let response = match request::parse(&method, &path, &body) {
        Err(err) => fault(StatusCode::BAD_REQUEST, &err.to_string()),
        Ok(Parsed::Version) => json(
            StatusCode::OK,
            &serde_json::json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }),
        ),
        Ok(Parsed::Vmm(action)) => vmm_response(call_vmm(handle, action).await),
    };
    tracing::debug!("API response: {method} {path} -> {}", response.status());
    response
}

/// Reads the whole body, within [`MAX_BODY_SIZE`] and [`BODY_TIMEOUT`].
async fn read_body(body: Incoming) -> Result<Bytes, Response<Full<Bytes>>> {
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_SIZE).collect());
    match collected.await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => Err(body_too_large()),
        Ok(Err(err)) => Err(fault(
            StatusCode::BAD_REQUEST,
            &format!("The request body could not be read: {err}."),
        )),
        Err(_) => Err(fault(
            StatusCode::BAD_REQUEST,
            &format!(
                "The request body did not arrive within {} seconds.",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Hands `action` to the VMM's event loop and waits for its answer.
async fn call_vmm(handle: &VmmHandle, action: VmmAction) -> ActionResult {
    let (sender, receiver) = oneshot::channel();
    handle.submit(
        action,
        Box::new(move |result| {
            // The client may have gone away meanwhile; then nobody needs the answer.
            let _ = sender.send(result);
        }),
    );
    receiver.await.unwrap_or_else(|_| {
        Err(ActionError::Internal(
            "The VMM dropped the request without answering it.".to_string(),
        ))
    })
}

/// Turns the VMM's answer into HTTP: 204 for success without data, 200 with JSON, 400 for a
/// refused request and 500 for a failure inside the VMM.
fn vmm_response(result: ActionResult) -> Response<Full<Bytes>> {
    match result {
        Ok(VmmData::Empty) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Ok(VmmData::InstanceInfo(info)) => json(StatusCode::OK, &info),
        Ok(VmmData::VmConfig(config)) => json(StatusCode::OK, &config),
        Ok(VmmData::MachineConfig(config)) => json(StatusCode::OK, &config),
        Ok(VmmData::Json(value)) => json(StatusCode::OK, &value),
        Err(ActionError::BadRequest(message)) => fault(StatusCode::BAD_REQUEST, &message),
        Err(ActionError::Internal(message)) => fault(StatusCode::INTERNAL_SERVER_ERROR, &message),
        Err(ActionError::PayloadTooLarge(message)) => {
            fault(StatusCode::PAYLOAD_TOO_LARGE, &message)
        }
    }
}

/// The answer to a body over [`MAX_BODY_SIZE`].
fn body_too_large() -> Response<Full<Bytes>> {
    fault(
        StatusCode::BAD_REQUEST,
        &format!("The request body is larger than the limit of {MAX_BODY_SIZE} bytes."),
    )
}

/// An error answer in Firecracker's shape: `{"fault_message": "..."}`.
fn fault(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "fault_message": message }))
}

/// A JSON answer.
fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(body) => (status, body),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "fault_message": format!("Cannot encode the answer: {err}.") })
                .to_string()
                .into_bytes(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
