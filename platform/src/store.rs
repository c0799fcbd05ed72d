//! Durable metadata in sled: templates, sessions and API keys.
//!
//! sled allows one process per database. Every thaw process (the CLI's embedded engine,
//! `thaw serve`) holds it only while it is using it, so that many `thaw` commands and a
//! server can share one home: it keeps the database open between units of work while they
//! come at least every [`HOLD_IDLE`], and hands it over as soon as another process waits for
//! it (a waiter leaves a marker file beside the database, which the holder checks around
//! every unit of work and every [`CLOSER_PERIOD`]). A waiter retries until it gets in.
//! [`Meta::with`] also serialises the threads of one process, so a read-modify-write inside
//! it is atomic across every thaw process on the machine. Every write is flushed before it
//! is acknowledged, so a process that dies holding the database loses nothing.
//!
//! Why hold it: opening sled allocates and zeroes its page table and cache (megabytes),
//! which under a rollout load was a third of the server's CPU when every unit of work
//! opened the database afresh.
//!
//! The invoke path reads two records (the API key, the template). [`Meta::get_cached`]
//! serves those from memory while no thaw process has written the database since: every
//! [`Meta::with`] replaces a small generation file beside the database, while it holds the
//! database and before it changes anything, so a reader that finds the generation it cached
//! under holds a value no write has replaced, and a reader that finds a new one waits for
//! the writer to finish before it reads again.

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

/// The database as this process holds it between units of work. sled's lock is per open
/// file, so two threads of one process would lock each other out: one unit of work at a time
/// per process, on one open database (of whichever home was used last; tests use several).
static HELD: Mutex<Held> = Mutex::new(Held {
    store: None,
    last_used: None,
    closer: false,
});

struct Held {
    store: Option<Store>,
    last_used: Option<Instant>,
    /// The thread that closes an idle or wanted database has been started.
    closer: bool,
}

/// A database unused for this long is closed (another process may want it).
pub const HOLD_IDLE: Duration = Duration::from_millis(100);
/// How often the closer looks for an idle or wanted database.
pub const CLOSER_PERIOD: Duration = Duration::from_millis(20);

/// The marker a process waiting for the database leaves beside it.
fn waiter_marker(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".waiting");
    db.with_file_name(name)
}

/// Another process is waiting for the database: its marker is fresh (a waiter rewrites it
/// at every try, at most 50 ms apart; one that died leaves a stale marker, ignored).
fn wanted(db: &Path) -> bool {
    std::fs::metadata(waiter_marker(db))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().map_or(true, |age| age < Duration::from_secs(1)))
}

fn held() -> std::sync::MutexGuard<'static, Held> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on this process's open database at `path`, opening it if needed, and hands it
/// over at once when another process is waiting.
fn unit_of_work<T>(path: &Path, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
    let mut h = held();
    if wanted(path) || h.store.as_ref().is_some_and(|s| s.path != path) {
        // Closed first: a waiter that gets in now is served before this unit of work.
        h.store = None;
    }
    let store = match h.store.take() {
        Some(s) => s,
        None => Store::open(path)?,
    };
    let r = f(&store);
    h.last_used = Some(Instant::now());
    if !wanted(path) {
        h.store = Some(store);
        if !h.closer {
            h.closer = start_closer();
        }
    }
    r
}

/// Starts the thread that closes the database when it is idle or wanted. Without it (the
/// thread could not be made) the database is closed after every unit of work, as before.
fn start_closer() -> bool {
    std::thread::Builder::new()
        .name("thaw-meta-closer".into())
        .spawn(|| loop {
            std::thread::sleep(CLOSER_PERIOD);
            let mut h = held();
            let Some(path) = h.store.as_ref().map(|s| s.path.clone()) else {
                continue;
            };
            let idle = h.last_used.is_none_or(|t| t.elapsed() > HOLD_IDLE);
            if idle || wanted(&path) {
                h.store = None;
            }
        })
        .is_ok()
}

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
        unit_of_work(&self.path, |store| {
            self.new_generation()?;
            f(store)
        })
    }

    /// Runs `f`, which only reads, with exclusive access to the database.
    pub fn read<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        unit_of_work(&self.path, f)
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
        let mut waited = false;
        loop {
            // No background flusher: every write here is flushed before it is acknowledged,
            // so the thread sled would start (and stop) at each open is pure cost.
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::LowSpace)
                .flush_every_ms(None)
                .open()
            {
                Ok(db) => {
                    if waited {
                        // Served: the holder may keep the database again. (Another waiter
                        // puts its marker back at its next try.)
                        let _ = std::fs::remove_file(waiter_marker(path));
                    }
                    return Ok(Store {
                        db,
                        path: path.to_path_buf(),
                    });
                }
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("lock") =>
                {
                    // Tells the holder to hand the database over (see the module docs).
                    let _ = std::fs::write(waiter_marker(path), b"");
                    waited = true;
                    if Instant::now() > deadline {
                        let _ = std::fs::remove_file(waiter_marker(path));
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
    fn a_held_database_is_kept_between_units_and_handed_to_a_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.sled");
        let a = Meta::new(&p);
        a.with(|s| s.put("t", "k", &1u32)).unwrap();
        // Kept open between units of work, as long as they keep coming.
        assert!(held().store.as_ref().is_some_and(|s| s.path == p));
        // Another opener (another process, as far as sled's lock can tell) waits, marks
        // itself, and is let in by the closer within a few of its periods.
        let started = Instant::now();
        let other = Store::open(&p).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(other.get::<u32>("t", "k").unwrap(), Some(1));
        assert!(
            !waiter_marker(&p).exists(),
            "the served waiter removes its marker"
        );
        drop(other);
        // And the first handle gets it back.
        assert_eq!(a.read(|s| s.get::<u32>("t", "k")).unwrap(), Some(1));
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
