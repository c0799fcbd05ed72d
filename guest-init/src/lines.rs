//! Cancellation-safe, length-capped line reading from an async byte stream.
//!
//! Used for the supervisor's status pipe and the persistent worker's stdout. All partial
//! state lives in the struct, so a `read_line` future dropped by `select!` loses nothing.

use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line without its newline; `overflow` means bytes past the cap were dropped.
    Line { data: Vec<u8>, overflow: bool },
    /// End of stream (any unterminated partial line is discarded).
    Eof,
}

pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of the current line already consumed past the cap.
    overflow: bool,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: Vec::new(),
            overflow: false,
            eof: false,
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Drops buffered bytes (stale output between exchanges).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }

    /// Reads the next line, keeping at most `cap` bytes of it.
    pub async fn read_line(&mut self, cap: usize) -> std::io::Result<Line> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut data: Vec<u8> = self.buf.drain(..=pos).collect();
                data.pop();
                let mut overflow = std::mem::take(&mut self.overflow);
                if data.len() > cap {
                    data.truncate(cap);
                    overflow = true;
                }
                return Ok(Line::Line { data, overflow });
            }
            if self.eof {
                return Ok(Line::Eof);
            }
            if self.buf.len() > cap {
                // Keep the first `cap` bytes, remember the rest was dropped, and keep
                // reading until the newline so the stream stays in sync.
                self.buf.truncate(cap);
                self.overflow = true;
            }
            let mut chunk = [0u8; 8192];
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                self.eof = true;
                continue;
            }
            let chunk = &chunk[..n];
            if self.overflow || self.buf.len() >= cap {
                // Past the cap: only look for the end of the line.
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(pos) => {
                        self.overflow = true;
                        self.buf.truncate(cap);
                        self.buf.push(b'\n');
                        self.buf.extend_from_slice(&chunk[pos + 1..]);
                    }
                    None => self.overflow = true,
                }
            } else {
                self.buf.extend_from_slice(chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str, overflow: bool) -> Line {
        Line::Line {
            data: s.as_bytes().to_vec(),
            overflow,
        }
    }

    #[tokio::test]
    async fn reads_lines_and_eof() {
        let mut r = LineReader::new(&b"a\nbc\npartial"[..]);
        assert_eq!(r.read_line(100).await.unwrap(), line("a", false));
        assert_eq!(r.read_line(100).await.unwrap(), line("bc", false));
        assert_eq!(r.read_line(100).await.unwrap(), Line::Eof);
    }

    #[tokio::test]
    async fn caps_long_lines_and_resyncs() {
        let long = "x".repeat(20_000);
        let input = format!("{long}\nnext\n");
        let mut r = LineReader::new(input.as_bytes());
        assert_eq!(r.read_line(10).await.unwrap(), line("xxxxxxxxxx", true));
        assert_eq!(r.read_line(10).await.unwrap(), line("next", false));
        let mut r = LineReader::new(&b"abcdef\nok\n"[..]);
        assert_eq!(r.read_line(3).await.unwrap(), line("abc", true));
        assert_eq!(r.read_line(3).await.unwrap(), line("ok", false));
    }
}
