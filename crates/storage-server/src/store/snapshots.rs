//! Snapshot commit and lookup. A snapshot's manifest is itself stored as
//! chunks; committing reads it back, validates every path and checks that
//! every chunk it names is durable here before the snapshot becomes visible.

use duplex_proto::v1::{EntryKind, FileEntry, Manifest, SnapshotInfo, change_record};
use duplex_types::{AccountId, ChunkId, SnapshotId, validate_relative_path};
use prost::Message;
use redb::ReadableDatabase;

use super::tables::{CHUNKS, FEED, SNAPSHOTS};
use super::{Store, StoreError};

/// What a client asks to commit.
pub struct NewSnapshot {
    pub manifest_chunks: Vec<ChunkId>,
    pub paths: Vec<String>,
    pub hostname: String,
}

impl Store {
    /// Reassembles and decodes a manifest from its chunks.
    pub fn load_manifest(&self, account: AccountId, chunks: &[ChunkId]) -> Result<Manifest, StoreError> {
        let mut bytes = Vec::new();
        for id in chunks {
            let chunk = self
                .read_chunk(account, *id)?
                .ok_or_else(|| StoreError::MissingChunks { count: 1, first: *id })?;
            let raw = super::decode_chunk(chunk.compression, chunk.raw_len as usize, &chunk.data)
                .map_err(|reason| StoreError::Corrupt { id: *id, reason })?;
            bytes.extend_from_slice(&raw);
        }
        Manifest::decode(bytes.as_slice())
            .map_err(|e| StoreError::Invalid(format!("manifest does not decode: {e}")))
    }

    pub fn commit_snapshot(&self, account: AccountId, new: NewSnapshot) -> Result<SnapshotInfo, StoreError> {
        if new.manifest_chunks.is_empty() {
            return Err(StoreError::Invalid("snapshot has no manifest".into()));
        }
        let manifest = self.load_manifest(account, &new.manifest_chunks)?;
        let (files, bytes, referenced) = check_manifest(&manifest)?;
        let missing = self.missing(account, &referenced)?;
        if let Some(first) = missing.first() {
            return Err(StoreError::MissingChunks {
                count: missing.len(),
                first: *first,
            });
        }
        let id = SnapshotId::generate();
        let info = SnapshotInfo {
            id: id.to_string(),
            time_unix_ms: now_ms(),
            files,
            bytes,
            paths: new.paths,
            manifest_chunks: new.manifest_chunks.iter().map(|c| c.to_vec()).collect(),
            hostname: new.hostname,
            origin: self.server_id().to_string(),
        };
        self.write(|txn, seq| {
            // The chunks were checked above; they cannot vanish since chunks
            // are never deleted while a write is in flight.
            txn.open_table(CHUNKS)?;
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            snapshots.insert((account.0, *id.as_bytes()), info.encode_to_vec().as_slice())?;
            *seq = seq.next();
            let record = self.change(*seq, account, change_record::Change::Snapshot(info.clone()));
            txn.open_table(FEED)?
                .insert(seq.0, record.encode_to_vec().as_slice())?;
            Ok(())
        })?;
        Ok(info)
    }

    pub fn list_snapshots(&self, account: AccountId) -> Result<Vec<SnapshotInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.range((account.0, [0u8; 16])..=(account.0, [0xffu8; 16]))? {
            let (_, v) = entry?;
            out.push(decode_info(v.value())?);
        }
        Ok(out)
    }

    /// Finds a snapshot by full id, unique prefix (6+ hex digits) or "latest".
    pub fn get_snapshot(&self, account: AccountId, query: &str) -> Result<SnapshotInfo, StoreError> {
        let all = self.list_snapshots(account)?;
        if query == "latest" {
            return all
                .into_iter()
                .last()
                .ok_or_else(|| StoreError::NotFound("no snapshot yet: latest".into()));
        }
        if query.len() < 6 || !query.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::Invalid(format!(
                "snapshot id {query:?} must be \"latest\" or at least 6 hex digits"
            )));
        }
        let query = query.to_ascii_lowercase();
        let mut matches: Vec<SnapshotInfo> = all.into_iter().filter(|s| s.id.starts_with(&query)).collect();
        match matches.len() {
            0 => Err(StoreError::NotFound(format!("snapshot {query}"))),
            1 => Ok(matches.remove(0)),
            n => Err(StoreError::Invalid(format!(
                "snapshot id prefix {query} matches {n} snapshots"
            ))),
        }
    }
}

fn decode_info(bytes: &[u8]) -> Result<SnapshotInfo, StoreError> {
    SnapshotInfo::decode(bytes)
        .map_err(|e| StoreError::Invalid(format!("stored snapshot record does not decode: {e}")))
}

/// Validates every entry; returns (files, bytes, every chunk id referenced).
pub fn check_manifest(manifest: &Manifest) -> Result<(u64, u64, Vec<ChunkId>), StoreError> {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut referenced = Vec::new();
    for entry in &manifest.entries {
        check_entry(entry)?;
        if entry.kind() == EntryKind::File {
            files += 1;
            bytes += entry.size;
        }
        for c in &entry.chunks {
            referenced.push(
                ChunkId::from_bytes(c).map_err(|e| StoreError::Invalid(format!("{}: {e}", entry.path)))?,
            );
        }
    }
    referenced.sort_unstable();
    referenced.dedup();
    Ok((files, bytes, referenced))
}

fn check_entry(entry: &FileEntry) -> Result<(), StoreError> {
    validate_relative_path(&entry.path)
        .map_err(|e| StoreError::Invalid(format!("manifest entry refused: {e}")))?;
    match EntryKind::try_from(entry.kind) {
        Ok(EntryKind::File) => Ok(()),
        Ok(EntryKind::Dir | EntryKind::Symlink) if entry.chunks.is_empty() => Ok(()),
        Ok(EntryKind::Dir | EntryKind::Symlink) => Err(StoreError::Invalid(format!(
            "manifest entry {:?} is not a file but names chunks",
            entry.path
        ))),
        _ => Err(StoreError::Invalid(format!(
            "manifest entry {:?} has unknown kind {}",
            entry.path, entry.kind
        ))),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
