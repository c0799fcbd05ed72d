//! Length-prefixed JSON frames, in blocking and (feature `tokio`) async flavours.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::MAX_FRAME;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed by peer")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Over the reader's own, smaller limit (see [`read_frame_async_max`]).
    #[error("frame of {len} bytes exceeds this exchange's {max}-byte limit")]
    OverLimit { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// A clean end of stream between frames (not an error for a server loop).
    pub fn is_closed(&self) -> bool {
        match self {
            FrameError::Closed => true,
            FrameError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// Serialises `msg` into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

fn check_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// [`check_len`] against a reader-chosen limit as well: the host reads a guest's frames
/// with the call's own budget, so a guest cannot make it allocate up to [`MAX_FRAME`].
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
fn check_len_max(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = check_len(header)?;
    if len > max {
        return Err(FrameError::OverLimit { len, max });
    }
    Ok(len)
}

pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = check_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(feature = "tokio")]
mod async_io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub async fn write_frame_async<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
    where
        W: AsyncWrite + Unpin,
        T: Serialize,
    {
        w.write_all(&encode(msg)?).await?;
        w.flush().await?;
        Ok(())
    }

    pub async fn read_frame_async<R, T>(r: &mut R) -> Result<T, FrameError>
    where
        R: AsyncRead + Unpin,
        T: DeserializeOwned,
    {
        read_frame_async_max(r, MAX_FRAME).await
    }

    /// Reads one frame of at most `max` bytes (and never more than [`MAX_FRAME`]). The length
    /// is checked before the body is allocated, so `max` bounds this read's memory whatever
    /// the peer claims. Returns the message with the frame's length (its body's bytes).
    pub async fn read_frame_async_sized<R, T>(
        r: &mut R,
        max: usize,
    ) -> Result<(T, usize), FrameError>
    where
        R: AsyncRead + Unpin,
        T: DeserializeOwned,
    {
        let mut header = [0u8; 4];
        match r.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
            Err(e) => return Err(e.into()),
        }
        let len = check_len_max(header, max)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        Ok((serde_json::from_slice(&body)?, len))
    }

    /// [`read_frame_async_sized`] without the length.
    pub async fn read_frame_async_max<R, T>(r: &mut R, max: usize) -> Result<T, FrameError>
    where
        R: AsyncRead + Unpin,
        T: DeserializeOwned,
    {
        Ok(read_frame_async_sized(r, max).await?.0)
    }
}

#[cfg(feature = "tokio")]
pub use async_io::{
    read_frame_async, read_frame_async_max, read_frame_async_sized, write_frame_async,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Ping).unwrap();
        write_frame(&mut buf, &Request::Shutdown).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Request::Ping);
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Request::Shutdown);
        assert!(matches!(
            read_frame::<_, Request>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let buf = u32::MAX.to_be_bytes();
        let err = read_frame::<_, Response>(&mut &buf[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");
    }

    #[test]
    fn truncated_body_is_an_io_error() {
        let mut buf = encode(&Request::Ping).unwrap();
        buf.truncate(buf.len() - 1);
        let err = read_frame::<_, Request>(&mut &buf[..]).unwrap_err();
        assert!(err.is_closed(), "{err}");
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"{{{");
        let err = read_frame::<_, Request>(&mut &buf[..]).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    #[tokio::test]
    async fn a_frame_over_the_callers_limit_is_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        // A header claiming 1 MiB, and no body: the reader must refuse on the header alone.
        tokio::io::AsyncWriteExt::write_all(&mut a, &(1u32 << 20).to_be_bytes())
            .await
            .unwrap();
        let err = read_frame_async_max::<_, Response>(&mut b, 4096)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::OverLimit {
                    len: 1048576,
                    max: 4096
                }
            ),
            "{err}"
        );
        write_frame_async(&mut a, &Response::Ok).await.unwrap();
        let (got, len) = read_frame_async_sized::<_, Response>(&mut b, 4096)
            .await
            .unwrap();
        assert_eq!(got, Response::Ok);
        assert_eq!(len, r#"{"type":"ok"}"#.len());
    }

    #[tokio::test]
    async fn async_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame_async(&mut a, &Response::Ok).await.unwrap();
        let got: Response = read_frame_async(&mut b).await.unwrap();
        assert_eq!(got, Response::Ok);
    }
}
