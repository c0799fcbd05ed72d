//! Durable metadata in sled: templates, sessions and API keys.
//!
//! sled allows one process per database. Every thaw process (the CLI's embedded engine,
//! `thaw serve`) opens it only for the millisecond or two that a metadata read or write
//! takes, retrying while another process holds it, so that many `thaw` commands and a server
//! can share one home. [`Meta::with`] also serialises the threads of one process, so a
//! read-modify-write inside it is atomic across every thaw process on the machine. Every
//! write is flushed before it is acknowledged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

const TEMPLATES: &str = "templates";
const SESSIONS: &str = "sessions";
const KEYS: &str = "keys";

/// Handle on the metadata database: opens it for each unit of work.
#[derive(Debug, Clone)]
pub struct Meta {
    path: PathBuf,
}

/// sled's lock is per open file, so two threads of one process would lock each other out:
/// one opener at a time per process.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Meta {
    pub fn new(path: impl Into<PathBuf>) -> Meta {
        Meta { path: path.into() }
    }

    /// Runs `f` with exclusive access to the database (across threads and processes).
    pub fn with<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let store = Store::open(&self.path)?;
        f(&store)
    }
}

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

    /// Reads, changes and writes back one record while holding the database, so no other
    /// thaw process can interleave (see [`Meta::with`]). `f` returning `Ok(None)` deletes it.
    pub fn update<T: Serialize + DeserializeOwned>(
        &self,
        tree: &str,
        key: &str,
        f: impl FnOnce(Option<T>) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let current = self.get::<T>(tree, key)?;
        let next = f(current)?;
        match &next {
            Some(v) => self.put(tree, key, v)?,
            None => {
                self.remove(tree, key)?;
            }
        }
        Ok(next)
    }

    /// Records whose key starts with `prefix`.
    pub fn list_prefix<T: DeserializeOwned>(&self, tree: &str, prefix: &str) -> Result<Vec<T>> {
        let t = self.db.open_tree(tree).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in t.scan_prefix(prefix.as_bytes()) {
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

    pub fn sessions_tree() -> &'static str {
        SESSIONS
    }

    pub fn keys_tree() -> &'static str {
        KEYS
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
