//! Bearer API keys for `thaw serve`.
//!
//! A key's secret is `thaw_<id>_<64 hex chars>`: the id is public (it names the key in
//! listings and is the owner id of everything created with the key, so it is kept to
//! `[a-z0-9]`), and the 32 random bytes after it are the credential. Only a blake3 hash of the
//! whole secret is stored: a leaked metadata database does not leak usable keys. A fast hash
//! is enough (no password KDF) because the secret has 256 bits of entropy, so there is
//! nothing to brute-force.
//!
//! Keys are machine-wide, not owner-scoped: they define the owners. Revoked keys stay listed
//! (with `revoked_at`) so that an audit can still name the owner of old sessions.

use serde::{Deserialize, Serialize};

use crate::audit::{AuditAction, AuditEvent};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::store::{Meta, Store};

/// Prefix of every secret: lets secret scanners and humans recognise a thaw key.
pub const SECRET_PREFIX: &str = "thaw_";
/// Hex characters in a key id (6 random bytes).
const ID_HEX_LEN: usize = 12;
/// Random bytes of the credential part of a secret.
const SECRET_BYTES: usize = 32;
/// Longest accepted key name: names show up in one-line listings.
const MAX_NAME_LEN: usize = 64;

// KeyRecord is in thaw-types (types/src/keys.rs).
pub use thaw_types::keys::KeyRecord;

/// What the keys tree stores: the record and the hash of the secret.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    #[serde(flatten)]
    record: KeyRecord,
    /// blake3 of the whole secret, hex.
    secret_blake3: String,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut buf);
    hex(&buf)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits a well-formed secret into its key id; `None` for anything else, so that garbage
/// never reaches the database lookup.
fn parse_secret(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(SECRET_PREFIX)?;
    let (id, cred) = rest.split_once('_')?;
    (id.len() == ID_HEX_LEN
        && is_lower_hex(id)
        && cred.len() == SECRET_BYTES * 2
        && is_lower_hex(cred))
    .then_some(id)
}

fn validate(name: &str, max_sandboxes: u32) -> Result<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::Other(format!(
            "API key name must be 1 to {MAX_NAME_LEN} printable characters, got {name:?}"
        )));
    }
    if max_sandboxes == 0 {
        return Err(Error::Other(
            "max_sandboxes must be at least 1 (revoke the key instead to disable it)".into(),
        ));
    }
    Ok(())
}

/// Creates a key; returns its record and the secret, which exists nowhere else afterwards.
pub fn create(
    meta: &Meta,
    name: &str,
    max_sandboxes: u32,
    admin: bool,
) -> Result<(KeyRecord, String)> {
    validate(name, max_sandboxes)?;
    meta.with(|store| {
        // 48 random bits: a collision is unlikely but would hand one key's sandboxes to
        // another owner, so it is checked, under the same lock as the insert.
        let id = loop {
            let id = random_hex(ID_HEX_LEN / 2);
            if store.get::<StoredKey>(Store::keys_tree(), &id)?.is_none() {
                break id;
            }
        };
        let secret = format!("{SECRET_PREFIX}{id}_{}", random_hex(SECRET_BYTES));
        let record = KeyRecord {
            id: id.clone(),
            name: name.to_string(),
            created_at: now_secs(),
            revoked_at: None,
            max_sandboxes,
            admin,
        };
        let stored = StoredKey {
            record: record.clone(),
            secret_blake3: blake3::hash(secret.as_bytes()).to_hex().to_string(),
        };
        store.put(Store::keys_tree(), &id, &stored)?;
        Ok((record, secret))
    })
}

/// Every key, revoked ones included, oldest first.
pub fn list(meta: &Meta) -> Result<Vec<KeyRecord>> {
    let mut keys: Vec<KeyRecord> = meta
        .read(|s| s.list::<StoredKey>(Store::keys_tree()))?
        .into_iter()
        .map(|k| k.record)
        .collect();
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(keys)
}

/// Revokes a key (idempotent: revoking twice keeps the first revocation time).
pub fn revoke(meta: &Meta, id: &str) -> Result<KeyRecord> {
    let updated = meta.with(|s| {
        s.update::<StoredKey>(Store::keys_tree(), id, |k| {
            Ok(k.map(|mut k| {
                k.record.revoked_at.get_or_insert_with(now_secs);
                k
            }))
        })
    })?;
    updated
        .map(|k| k.record)
        .ok_or_else(|| Error::NotFound(format!("API key `{id}`; `thaw keys ls` lists the keys")))
}

/// The live (not revoked) key whose secret this is, if any.
pub fn verify(meta: &Meta, secret: &str) -> Result<Option<KeyRecord>> {
    let Some(id) = parse_secret(secret) else {
        return Ok(None);
    };
    let Some(stored) = meta.get_cached::<StoredKey>(Store::keys_tree(), id)? else {
        return Ok(None);
    };
    let Ok(expected) = blake3::Hash::from_hex(&stored.secret_blake3) else {
        return Err(Error::Other(format!(
            "API key `{id}` has a damaged hash in the metadata store; revoke it and create a new one"
        )));
    };
    // blake3::Hash's PartialEq compares in constant time, so response timing does not reveal
    // how much of a guessed secret was right.
    if blake3::hash(secret.as_bytes()) != expected || stored.record.revoked_at.is_some() {
        return Ok(None);
    }
    Ok(Some(stored.record))
}

impl Engine {
    /// Creates an API key. The returned secret is shown once and stored nowhere.
    pub fn create_key(
        &self,
        name: &str,
        max_sandboxes: u32,
        admin: bool,
    ) -> Result<(KeyRecord, String)> {
        self.audit_ready()?;
        let (k, secret) = create(&self.meta, name, max_sandboxes, admin)?;
        // The key's id and settings; never its secret.
        let event = AuditEvent::new(AuditAction::KeyCreate)
            .with("key", &k.id)
            .with("name", &k.name)
            .with("admin", k.admin)
            .with("max_sandboxes", k.max_sandboxes);
        self.audited(Ok((k, secret)), vec![event])
    }

    /// Every API key on this machine, revoked ones included.
    pub fn keys(&self) -> Result<Vec<KeyRecord>> {
        list(&self.meta)
    }

    /// Revokes a key. It happens even when the audit log cannot be written (its record
    /// then goes to the error log): a broken log must not keep a key alive.
    pub fn revoke_key(&self, id: &str) -> Result<KeyRecord> {
        let r = revoke(&self.meta, id);
        let event = AuditEvent::new(AuditAction::KeyRevoke).with("key", id);
        match r {
            Ok(k) => self.audited_anyway(Ok(k), vec![event]),
            Err(e) => Err(e),
        }
    }

    /// The key a bearer secret belongs to; `None` when it is unknown, malformed or revoked.
    pub fn verify_key(&self, secret: &str) -> Result<Option<KeyRecord>> {
        verify(&self.meta, secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::new(dir.path().join("meta.sled"));
        (dir, m)
    }

    #[test]
    fn created_key_verifies_and_has_the_documented_shape() {
        let (_d, m) = meta();
        let (rec, secret) = create(&m, "ci", 4, false).unwrap();
        assert_eq!(rec.id.len(), 12);
        assert!(rec
            .id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert!(secret.starts_with(&format!("thaw_{}_", rec.id)), "{secret}");
        assert_eq!(secret.len(), "thaw_".len() + 12 + 1 + 64);
        assert_eq!(verify(&m, &secret).unwrap(), Some(rec.clone()));
        assert_eq!(rec.max_sandboxes, 4);
        assert_eq!(rec.revoked_at, None);
    }

    #[test]
    fn the_secret_is_not_stored() {
        let (d, m) = meta();
        let (_rec, secret) = create(&m, "ci", 1, false).unwrap();
        drop(m);
        let cred = secret.rsplit('_').next().unwrap();
        // Waits for this process's held handle to be handed over (nothing takes it back).
        drop(crate::store::Store::open(&d.path().join("meta.sled")).unwrap());
        let db = sled::open(d.path().join("meta.sled")).unwrap();
        for tree in db.tree_names() {
            for kv in db.open_tree(tree).unwrap().iter() {
                let (_, v) = kv.unwrap();
                let text = String::from_utf8_lossy(&v);
                assert!(!text.contains(cred), "secret stored in clear: {text}");
            }
        }
    }

    #[test]
    fn wrong_or_malformed_secrets_do_not_verify() {
        let (_d, m) = meta();
        let (rec, secret) = create(&m, "ci", 1, false).unwrap();
        // Same id, different credential.
        let mut forged = secret.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert_eq!(verify(&m, &forged).unwrap(), None);
        for bad in [
            "",
            "thaw_",
            "Bearer x",
            &format!("thaw_{}", rec.id),
            &format!("thaw_{}_", rec.id),
            &secret.to_uppercase(),
            &format!("{secret}0"),
            &format!("thaw_ffffffffffff_{}", "0".repeat(64)),
        ] {
            assert_eq!(verify(&m, bad).unwrap(), None, "{bad:?} verified");
        }
    }

    #[test]
    fn revoked_keys_stop_verifying_but_stay_listed() {
        let (_d, m) = meta();
        let (a, sa) = create(&m, "a", 1, false).unwrap();
        let (b, sb) = create(&m, "b", 2, false).unwrap();
        let revoked = revoke(&m, &a.id).unwrap();
        let at = revoked.revoked_at.expect("revoked_at set");
        assert_eq!(verify(&m, &sa).unwrap(), None);
        assert_eq!(verify(&m, &sb).unwrap(), Some(b.clone()));
        // Idempotent: the first revocation time stays.
        assert_eq!(revoke(&m, &a.id).unwrap().revoked_at, Some(at));
        let listed = list(&m).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .any(|k| k.id == a.id && k.revoked_at == Some(at)));
        assert!(listed.iter().any(|k| k == &b));
    }

    #[test]
    fn revoking_an_unknown_key_is_not_found() {
        let (_d, m) = meta();
        let e = revoke(&m, "000000000000").unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert!(e.to_string().contains("000000000000"), "{e}");
    }

    #[test]
    fn bad_names_and_zero_limits_are_refused() {
        let (_d, m) = meta();
        assert!(create(&m, "", 1, false).is_err());
        assert!(create(&m, "  ", 1, false).is_err());
        assert!(create(&m, "a\nb", 1, false).is_err());
        assert!(create(&m, &"x".repeat(65), 1, false).is_err());
        assert!(create(&m, "ok", 0, false).is_err());
        assert!(list(&m).unwrap().is_empty());
    }

    #[test]
    fn ids_are_unique() {
        let (_d, m) = meta();
        let mut ids = std::collections::HashSet::new();
        for i in 0..20 {
            let (rec, _) = create(&m, &format!("k{i}"), 1, false).unwrap();
            assert!(ids.insert(rec.id));
        }
    }
}
