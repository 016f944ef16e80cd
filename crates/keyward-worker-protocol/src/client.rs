//! [`WorkerConn`]: the gateway's side of the worker socket, typed. One connection carries one
//! exchange at a time; each method sends its request and reads the answer it expects, so no
//! caller writes frames by hand.

use std::path::Path;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{
    read_frame, CallRequest, FailKind, FrameIoError, FromWorker, OpenRequest, ProtocolError, RewrapRequest, ToWorker,
};

/// How an exchange with a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker answered `Fail`: the exchange is over and the connection can be reused.
    #[error("{message}")]
    Refused { kind: FailKind, message: String },
    /// The worker went away or broke the protocol: the connection is done.
    #[error("the worker is gone: {0}")]
    Gone(String),
}

impl From<FrameIoError> for WorkerError {
    fn from(e: FrameIoError) -> WorkerError {
        WorkerError::Gone(e.to_string())
    }
}

/// The head of a provider's answer (the body follows through [`WorkerConn::next_chunk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct WorkerConn {
    /// Buffered for reading: the frames of a finished answer (head, body, end) arrive in
    /// one write and are read with one syscall.
    stream: BufReader<UnixStream>,
    buf: Vec<u8>,
}

impl WorkerConn {
    pub async fn connect(path: &Path) -> std::io::Result<WorkerConn> {
        Ok(WorkerConn {
            stream: BufReader::new(UnixStream::connect(path).await?),
            buf: Vec::with_capacity(4096),
        })
    }

    /// The worker's uid and pid, as the kernel recorded them when it connected
    /// (SO_PEERCRED): a restarted worker is a new pid, a worker of the wrong user is seen.
    pub fn peer(&self) -> Option<(u32, i32)> {
        let cred = self.stream.get_ref().peer_cred().ok()?;
        Some((cred.uid(), cred.pid()?))
    }

    async fn send(&mut self, msg: &ToWorker) -> Result<(), WorkerError> {
        let frame = msg.encode().map_err(|e| WorkerError::Gone(e.to_string()))?;
        self.stream
            .get_mut()
            .write_all(&frame)
            .await
            .map_err(|e| WorkerError::Gone(e.to_string()))
    }

    /// The next frame; an EOF here means the worker died mid-exchange.
    async fn recv(&mut self) -> Result<FromWorker, WorkerError> {
        match read_frame(&mut self.stream, &mut self.buf).await? {
            Some(()) => Ok(FromWorker::decode(&self.buf).map_err(FrameIoError::Protocol)?),
            None => Err(WorkerError::Gone("the worker closed the connection".to_owned())),
        }
    }

    /// A frame that is not an answer to what was asked.
    fn unexpected(what: &'static str) -> WorkerError {
        WorkerError::Gone(ProtocolError::Malformed(what).to_string())
    }

    /// Ping round trip: the worker is up and speaks this protocol.
    pub async fn ping(&mut self) -> Result<(), WorkerError> {
        self.send(&ToWorker::Ping).await?;
        match self.recv().await? {
            FromWorker::Pong => Ok(()),
            _ => Err(Self::unexpected("expected pong")),
        }
    }

    /// Starts a provider call; answers once the provider's response head is in. Read the
    /// body with [`WorkerConn::next_chunk`] until it answers `None`.
    pub async fn call(&mut self, request: &CallRequest) -> Result<ResponseHead, WorkerError> {
        self.send(&ToWorker::Call(request.clone())).await?;
        match self.recv().await? {
            FromWorker::Head { status, headers } => Ok(ResponseHead { status, headers }),
            FromWorker::Fail { kind, message } => Err(WorkerError::Refused { kind, message }),
            _ => Err(Self::unexpected("expected the answer's head")),
        }
    }

    /// The next body chunk of a call's answer as it arrives; `None` at its clean end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, WorkerError> {
        match self.recv().await? {
            FromWorker::Chunk(b) => Ok(Some(b)),
            FromWorker::End => Ok(None),
            FromWorker::Fail { kind, message } => Err(WorkerError::Refused { kind, message }),
            _ => Err(Self::unexpected("expected a body chunk")),
        }
    }

    /// Opens a blob in the worker and wipes it, calling no one.
    pub async fn open_only(&mut self, request: &OpenRequest) -> Result<(), WorkerError> {
        self.send(&ToWorker::OpenOnly(request.clone())).await?;
        match self.recv().await? {
            FromWorker::End => Ok(()),
            FromWorker::Fail { kind, message } => Err(WorkerError::Refused { kind, message }),
            _ => Err(Self::unexpected("expected the end of an open")),
        }
    }

    /// Moves a blob to another KEK version inside the worker: the new blob.
    pub async fn rewrap(&mut self, request: &RewrapRequest) -> Result<Vec<u8>, WorkerError> {
        self.send(&ToWorker::Rewrap(request.clone())).await?;
        match self.recv().await? {
            FromWorker::Sealed(blob) => Ok(blob),
            FromWorker::Fail { kind, message } => Err(WorkerError::Refused { kind, message }),
            _ => Err(Self::unexpected("expected a sealed blob")),
        }
    }
}
