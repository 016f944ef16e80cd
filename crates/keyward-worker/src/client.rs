//! The gateway's side of the worker socket: one connection carries one exchange at a time.

use std::path::Path;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{read_frame, FrameIoError, FromWorker, ProtocolError, ToWorker};

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

    pub async fn send(&mut self, msg: &ToWorker) -> Result<(), FrameIoError> {
        let frame = msg.encode().map_err(FrameIoError::Protocol)?;
        self.stream.get_mut().write_all(&frame).await.map_err(FrameIoError::Io)
    }

    /// The next frame; an EOF here means the worker died mid-exchange.
    pub async fn recv(&mut self) -> Result<FromWorker, FrameIoError> {
        match read_frame(&mut self.stream, &mut self.buf).await? {
            Some(()) => FromWorker::decode(&self.buf).map_err(FrameIoError::Protocol),
            None => Err(FrameIoError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the worker closed the connection",
            ))),
        }
    }

    /// Ping round trip: the worker is up and speaks our protocol.
    pub async fn ping(&mut self) -> Result<(), FrameIoError> {
        self.send(&ToWorker::Ping).await?;
        match self.recv().await? {
            FromWorker::Pong => Ok(()),
            _ => Err(FrameIoError::Protocol(ProtocolError::Malformed("expected pong"))),
        }
    }
}
