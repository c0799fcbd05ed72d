//! Durable metadata in sled: templates (and, later, sessions and API keys).
//!
//! sled allows one process per database. The CLI's embedded engine opens it only for the few
//! milliseconds a metadata read or write takes, retrying while another thaw process holds
//! it, so that many `thaw invoke`s can run side by side. Every write is flushed before it is
//! acknowledged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

const TEMPLATES: &str = "templates";

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut delay = Duration::from_millis(2);
        loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::LowSpace)
                .open()
            {
                Ok(db) => {
                    return Ok(Store {
                        db,
                        path: path.to_path_buf(),
                    })
                }
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("lock") =>
                {
                    if Instant::now() > deadline {
                        return Err(Error::Store {
                            path: path.to_path_buf(),
                            message: "locked by another thaw process for 30 s; if `thaw serve` runs, pass --server to use it".into(),
                        });
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Error::Store {
                        path: path.to_path_buf(),
                        message: format!(
                            "{e}. Fix: restore it from backup, or move it away to start empty"
                        ),
                    })
                }
            }
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, tree: &str, key: &str) -> Result<Option<T>> {
        let t = self.db.open_tree(tree).map_err(|e| self.err(e))?;
        match t.get(key.as_bytes()).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.err(format!("record {tree}/{key} is unreadable: {e}"))),
        }
    }

    pub fn put<T: Serialize>(&self, tree: &str, key: &str, value: &T) -> Result<()> {
        let t = self.db.open_tree(tree).map_err(|e| self.err(e))?;
        let bytes = serde_json::to_vec(value).map_err(|e| self.err(e))?;
        t.insert(key.as_bytes(), bytes).map_err(|e| self.err(e))?;
        t.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn remove(&self, tree: &str, key: &str) -> Result<bool> {
        let t = self.db.open_tree(tree).map_err(|e| self.err(e))?;
        let old = t.remove(key.as_bytes()).map_err(|e| self.err(e))?;
        t.flush().map_err(|e| self.err(e))?;
        Ok(old.is_some())
    }

    pub fn list<T: DeserializeOwned>(&self, tree: &str) -> Result<Vec<T>> {
        let t = self.db.open_tree(tree).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in t.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            out.push(serde_json::from_slice(&v).map_err(|e| {
                self.err(format!(
                    "record {tree}/{} is unreadable: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?);
        }
        Ok(out)
    }

    pub fn templates_tree() -> &'static str {
        TEMPLATES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_remove_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p).unwrap();
            s.put("t", "a", &1u32).unwrap();
            s.put("t", "b", &2u32).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.get::<u32>("t", "a").unwrap(), Some(1));
        assert_eq!(s.list::<u32>("t").unwrap(), vec![1, 2]);
        assert!(s.remove("t", "a").unwrap());
        assert_eq!(s.get::<u32>("t", "a").unwrap(), None);
    }
}
