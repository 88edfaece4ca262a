//! Mending damaged chunks with intact copies from another server.
//!
//! A repair writes the copies into a new pack like any upload, fsyncs it,
//! and then, in one transaction, points each damaged index entry at its
//! copy, but only if the entry is still the damaged one it saw: a chunk
//! swept or moved by garbage collection meanwhile is left as it is. The
//! old pack keeps the damaged bytes until a compaction drops them.

use std::collections::{BTreeMap, HashSet};

use duplex_types::{AccountId, ChunkId};
use redb::{ReadableDatabase, ReadableTable};

use super::tables::{CHUNKS, ChunkLoc, ChunkLocTuple, META};
use super::{PackWriter, Store, StoreError, codec, index_chunks, packs, tables, usage};

/// A chunk needing repair and the index entry it had when found: `None`
/// when the index names no copy at all.
pub type Damaged = BTreeMap<ChunkId, Option<ChunkLocTuple>>;

impl Store {
    /// The chunks among `ids` that `account` lacks or holds damaged.
    pub fn damaged(&self, account: AccountId, ids: &[ChunkId]) -> Result<Damaged, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let mut out = Damaged::new();
        for &id in ids {
            let Some(loc) = chunks.get((account.0, *id.as_bytes()))?.map(|v| v.value()) else {
                out.insert(id, None);
                continue;
            };
            let decoded = ChunkLoc::from_tuple(loc);
            let intact = packs::read(&self.packs_dir, &decoded)
                .is_ok_and(|data| codec::check_stored(id, &decoded.hash, &data).is_ok());
            if !intact {
                out.insert(id, Some(loc));
            }
        }
        Ok(out)
    }

    /// Indexes the copies written to `writer` in place of the `damaged`
    /// entries they mend. A copy of a chunk the index lacked is indexed as
    /// a new chunk (a feed record, counted in the account's usage); a copy
    /// of a corrupt one replaces its entry. Returns how many were indexed.
    pub fn commit_repair(
        &self,
        writer: &mut PackWriter,
        account: AccountId,
        damaged: &Damaged,
    ) -> Result<u64, StoreError> {
        let copies = writer.sync()?;
        if let Some(other) = copies.iter().find(|p| p.account != account) {
            return Err(StoreError::Invalid(format!(
                "a repair of account {} wrote a chunk of account {}",
                account.0, other.account.0
            )));
        }
        let origin = self.server_id.to_string();
        let mut mended = 0;
        self.write(|txn, seq| {
            let mut fresh = Vec::new();
            let mut grown: i64 = 0;
            {
                let mut chunks = txn.open_table(CHUNKS)?;
                // A source that sent a chunk twice: the first copy serves.
                let mut seen = HashSet::new();
                for copy in copies.iter().filter(|c| seen.insert(c.id)) {
                    let key = (account.0, *copy.id.as_bytes());
                    let now = chunks.get(key)?.map(|v| v.value());
                    match (damaged.get(&copy.id), now) {
                        (Some(Some(was)), Some(now)) if *was == now => {
                            chunks.insert(key, copy.loc.to_tuple())?;
                            grown += i64::from(copy.loc.len) - i64::from(now.2);
                            mended += 1;
                        }
                        (Some(None), None) => fresh.push(copy.clone()),
                        // Not asked for, or changed since it was found.
                        _ => {}
                    }
                }
            }
            mended += index_chunks(txn, seq, &fresh, &origin)?.stored;
            resize(txn, account, grown)
        })?;
        Ok(mended)
    }
}

/// Keeps usage true when a copy is not the same size as the bytes it
/// replaces (a copy sealed separately on the other site).
fn resize(txn: &redb::WriteTransaction, account: AccountId, grown: i64) -> Result<(), StoreError> {
    if grown == 0 {
        return Ok(());
    }
    let delta = grown.unsigned_abs();
    let mut meta = txn.open_table(META)?;
    let total = tables::counter(&meta, tables::STORED_BYTES)?;
    let total = if grown > 0 {
        usage::add_bytes(txn, &BTreeMap::from([(account.0, delta)]))?;
        total + delta
    } else {
        usage::sub_bytes(txn, account, delta)?;
        total.saturating_sub(delta)
    };
    meta.insert(tables::STORED_BYTES, total.to_le_bytes().as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use duplex_types::{AccountId, ChunkId};
    use redb::ReadableDatabase;

    use super::super::tables::{CHUNKS, ChunkLoc};
    use super::super::tests::{chunk, put};
    use super::super::{Store, packs};

    const A: AccountId = AccountId(1);

    fn loc(store: &Store, name: &[u8]) -> ChunkLoc {
        let txn = store.db.begin_read().expect("read");
        let table = txn.open_table(CHUNKS).expect("table");
        let v = table
            .get((A.0, *ChunkId::of(name).as_bytes()))
            .expect("get")
            .expect("indexed");
        ChunkLoc::from_tuple(v.value())
    }

    /// Flips the last byte of `name`'s payload on disk.
    fn corrupt(store: &Store, name: &[u8]) {
        let at = loc(store, name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(packs::pack_path(&store.packs_dir, at.pack))
            .expect("pack");
        let end = at.offset + u64::from(at.len) - 1;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, end).expect("read");
        file.write_all_at(&[byte[0] ^ 0xff], end).expect("write");
    }

    fn unindex(store: &Store, name: &[u8]) {
        let txn = store.db.begin_write().expect("write");
        txn.open_table(CHUNKS)
            .expect("table")
            .remove((A.0, *ChunkId::of(name).as_bytes()))
            .expect("remove");
        txn.commit().expect("commit");
    }

    /// Writes the intact copies of `names` into a pack of `store` and
    /// commits them as a repair of what `damaged` found.
    fn mend(store: &Store, names: &[&[u8]]) -> u64 {
        let ids: Vec<ChunkId> = names.iter().map(|n| ChunkId::of(n)).collect();
        let damaged = store.damaged(A, &ids).expect("damaged");
        let mut writer = store.begin_pack().expect("pack");
        for n in names {
            writer.add(A, &chunk(n)).expect("add");
        }
        store.commit_repair(&mut writer, A, &damaged).expect("repair")
    }

    #[test]
    fn corrupt_and_missing_chunks_are_mended_and_intact_ones_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        put(&store, A, &[chunk(b"bad"), chunk(b"lost"), chunk(b"fine")]).expect("put");
        let usage = store.usage().expect("usage")[0].stored_bytes;
        corrupt(&store, b"bad");
        unindex(&store, b"lost");
        let all = [ChunkId::of(b"bad"), ChunkId::of(b"lost"), ChunkId::of(b"fine")];
        let damaged = store.damaged(A, &all).expect("damaged");
        assert_eq!(damaged.len(), 2, "{damaged:?}");
        assert!(damaged[&all[0]].is_some() && damaged[&all[1]].is_none());

        let seq = store.last_seq();
        assert_eq!(mend(&store, &[b"bad", b"lost", b"fine"]), 2);
        assert!(store.damaged(A, &all).expect("damaged").is_empty());
        let read = store.read_chunk(A, all[0]).expect("read").expect("held");
        assert_eq!(read.data, chunk(b"bad").data);
        // The re-indexed chunk is a new write (a feed record, counted); the
        // re-pointed one changes neither.
        assert_eq!(store.last_seq().0, seq.0 + 1);
        let lost = chunk(b"lost").data.len() as u64;
        assert_eq!(store.usage().expect("usage")[0].stored_bytes, usage + lost);
        // A second pass finds nothing left to do.
        assert_eq!(mend(&store, &[b"bad", b"lost"]), 0);
    }

    #[test]
    fn an_entry_changed_since_it_was_found_damaged_is_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        put(&store, A, &[chunk(b"bad")]).expect("put");
        corrupt(&store, b"bad");
        let id = ChunkId::of(b"bad");
        let damaged = store.damaged(A, &[id]).expect("damaged");
        // Swept by garbage collection between the check and the commit.
        unindex(&store, b"bad");
        let mut writer = store.begin_pack().expect("pack");
        writer.add(A, &chunk(b"bad")).expect("add");
        assert_eq!(store.commit_repair(&mut writer, A, &damaged).expect("repair"), 0);
        assert!(store.read_chunk(A, id).expect("read").is_none());
    }
}
