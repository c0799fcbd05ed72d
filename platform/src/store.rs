//! Durable metadata in sled: templates, sessions and API keys.
//!
//! sled allows one process per database. Every thaw process (the CLI's embedded engine,
//! `thaw serve`) opens it only for the millisecond or two that a metadata read or write
//! takes, retrying while another process holds it, so that many `thaw` commands and a server
//! can share one home. [`Meta::with`] also serialises the threads of one process, so a
//! read-modify-write inside it is atomic across every thaw process on the machine. Every
//! write is flushed before it is acknowledged.
//!
//! Opening sled costs about a millisecond and a half, and the invoke path reads two records
//! (the API key, the template). [`Meta::get_cached`] serves those from memory while no
//! thaw process has written the database since: every [`Meta::with`] replaces a small
//! generation file beside the database, while it holds the database and before it changes
//! anything, so a reader that finds the generation it cached under holds a value no write
//! has replaced, and a reader that finds a new one waits for the writer to finish before it
//! reads again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    cache: Arc<Mutex<HashMap<(String, String), Cached>>>,
}

/// A record as read under one generation of the database.
#[derive(Debug)]
struct Cached {
    generation: String,
    bytes: Vec<u8>,
}

/// sled's lock is per open file, so two threads of one process would lock each other out:
/// one opener at a time per process.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Meta {
    pub fn new(path: impl Into<PathBuf>) -> Meta {
        Meta {
            path: path.into(),
            cache: Arc::default(),
        }
    }

    /// Runs `f`, which may write, with exclusive access to the database (across threads and
    /// processes). Every cached record of every thaw process is stale from here on.
    pub fn with<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let store = Store::open(&self.path)?;
        self.new_generation()?;
        f(&store)
    }

    /// Runs `f`, which only reads, with exclusive access to the database.
    pub fn read<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let store = Store::open(&self.path)?;
        f(&store)
    }

    /// One record, from memory if no thaw process has written the database since it was
    /// read. Absent records are not cached: a caller probing random keys grows nothing.
    pub fn get_cached<T: DeserializeOwned>(&self, tree: &str, key: &str) -> Result<Option<T>> {
        // Read before the database: a write that lands in between makes the entry stale
        // at once, never the other way round.
        let generation = self.generation();
        let slot = (tree.to_string(), key.to_string());
        if let Some(g) = &generation {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&slot).filter(|c| &c.generation == g) {
                return decode(&self.path, tree, key, &c.bytes).map(Some);
            }
        }
        let Some(bytes) = self.read(|s| s.get_raw(tree, key))? else {
            return Ok(None);
        };
        let value = decode(&self.path, tree, key, &bytes)?;
        if let Some(generation) = generation {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.insert(slot, Cached { generation, bytes });
        }
        Ok(Some(value))
    }

    fn generation_file(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".generation");
        self.path.with_file_name(name)
    }

    /// `None` when there is none to trust (never written, or unreadable): nothing is
    /// served from memory then.
    fn generation(&self) -> Option<String> {
        std::fs::read_to_string(self.generation_file())
            .ok()
            .filter(|g| !g.is_empty())
    }

    /// Replaces the generation with a random one (written aside and renamed, so readers see
    /// the old or the new, whole). If that fails, e.g. on a full disk, the file is removed,
    /// which turns every cache off; a database that cannot say it changed is not written.
    fn new_generation(&self) -> Result<()> {
        let path = self.generation_file();
        let tmp = path.with_extension(format!("generation.{}", std::process::id()));
        let generation = format!("{:032x}", rand::random::<u128>());
        let written = std::fs::write(&tmp, generation).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            if let Err(e2) = std::fs::remove_file(&path) {
                if e2.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::Store {
                        path: path.clone(),
                        message: format!(
                            "cannot record a new generation ({e}) nor remove the old one \
                             ({e2}); fix the file's permissions or free disk space"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(path: &Path, tree: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store {
        path: path.to_path_buf(),
        message: format!("record {tree}/{key} is unreadable: {e}"),
    })
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut delay = Duration::from_millis(2);
        loop {
            // No background flusher: every write here is flushed before it is acknowledged,
            // and the database is open only for the millisecond a unit of work takes, so
            // the thread sled would start (and stop) at each open is pure cost.
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::LowSpace)
                .flush_every_ms(None)
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
        self.get_raw(tree, key)?
            .map(|v| decode(&self.path, tree, key, &v))
            .transpose()
    }

    fn get_raw(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let t = self.db.open_tree(tree).map_err(|e| self.err(e))?;
        Ok(t.get(key.as_bytes())
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
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

    /// Template key -> the index of its uid range ([`crate::container::userns::IdMap`]).
    pub fn id_ranges_tree() -> &'static str {
        "id_ranges"
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

    #[test]
    fn a_cached_record_is_served_from_memory_until_any_handle_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.sled");
        // Two handles with their own caches: two thaw processes sharing a home.
        let (a, b) = (Meta::new(&p), Meta::new(&p));
        b.with(|s| s.put("t", "k", &1u32)).unwrap();
        assert_eq!(a.get_cached::<u32>("t", "k").unwrap(), Some(1));

        // While the database is held open (by anyone), only the memory can answer.
        let held = Store::open(&p).unwrap();
        assert_eq!(a.get_cached::<u32>("t", "k").unwrap(), Some(1));
        drop(held);

        // The other handle's write is seen by the first handle's next read.
        b.with(|s| s.put("t", "k", &2u32)).unwrap();
        assert_eq!(a.get_cached::<u32>("t", "k").unwrap(), Some(2));
        b.with(|s| s.remove("t", "k")).unwrap();
        assert_eq!(a.get_cached::<u32>("t", "k").unwrap(), None);
        assert!(a.cache.lock().unwrap().values().all(|c| c.bytes != b"1"));
    }

    #[test]
    fn without_a_generation_nothing_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.sled");
        let a = Meta::new(&p);
        a.with(|s| s.put("t", "k", &1u32)).unwrap();
        assert_eq!(a.get_cached::<u32>("t", "k").unwrap(), Some(1));
        // A writer that keeps no generation (an older thaw) after it was removed.
        std::fs::remove_file(a.generation_file()).unwrap();
        Store::open(&p).unwrap().put("t", "k", &3u32).unwrap();
        assert_eq!(a.get_cached::<u32>("t", "k").unwrap(), Some(3));
    }

    #[test]
    fn absent_records_are_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let a = Meta::new(dir.path().join("meta.sled"));
        a.with(|s| s.put("t", "k", &1u32)).unwrap();
        for i in 0..100 {
            assert_eq!(
                a.get_cached::<u32>("t", &format!("probe{i}")).unwrap(),
                None
            );
        }
        assert!(a.cache.lock().unwrap().is_empty());
    }
}
