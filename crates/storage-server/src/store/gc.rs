//! Garbage collection: mark what live snapshots reference, sweep the rest
//! from the index, compact packs whose bytes are mostly dead.
//!
//! **Why a backup running at the same moment never loses a chunk.** A
//! snapshot commit checks, in its own write transaction, that every chunk
//! it names (manifest, reference blobs, the ids in them) is indexed
//! (`references::check_held`). Sweeps remove index entries in write
//! transactions too, and redb runs write transactions one at a time. So
//! either the sweep comes first and the commit is refused with the missing
//! ids (the agent uploads them again and commits), or the commit comes
//! first and the sweep, which adds every snapshot committed since the mark
//! to the live set inside its own transaction (`catch_up`), keeps them. No
//! committed snapshot ever names a collected chunk.
//!
//! The grace period is what keeps that refusal rare rather than what makes
//! it safe: chunks written within it (from the feed's times) and chunks
//! `MissingChunks` answered present within it (kept in memory, so a server
//! that started less than a grace period ago sweeps nothing) are spared,
//! so an upload in progress is not collected under it.
//!
//! **Crash at any point.** A sweep batch is one transaction. A compaction
//! writes the live chunks to a new pack, fsyncs it and its directory entry,
//! then re-points the index and lists the old packs as retired in one
//! transaction; retired packs are deleted after a delay (a reader that
//! looked a chunk up a moment before still finds the old file). On start,
//! retired packs and pack files no index entry names are deleted: a pack
//! from a compaction that never switched, or an upload that never
//! committed, since nothing is in flight at start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use duplex_proto::v1::change_record;
use duplex_types::{AccountId, ChunkId, Seq};
use redb::{ReadableDatabase, ReadableTable, Table, TableDefinition};

use super::packs::lock;
use super::references;
use super::tables::{CHUNKS, ChunkKey, ChunkLoc, ChunkLocTuple, FEED, META};
use super::usage::ACCOUNTS;
use super::{Store, StoreError, codec, fsync_dir, packs, tables};

/// pack → when it was retired (unix ms); deleted once the delay has passed.
pub const RETIRED: TableDefinition<u64, i64> = TableDefinition::new("retired_packs");
/// account → chunk bytes of it swept, ever.
pub const RECLAIMED: TableDefinition<u64, u64> = TableDefinition::new("reclaimed");
/// META keys of the server's totals.
pub const SWEPT_BYTES: &str = "gc_swept_bytes";
pub const RECLAIMED_BYTES: &str = "gc_reclaimed_bytes";

/// Index entries removed per write transaction, so a sweep never holds
/// up a commit for long.
const SWEEP_BATCH: usize = 4096;
/// A compaction writes its copy to disk every this many bytes.
const WRITE_BACK_EVERY: u64 = 8 << 20;
/// Most chunk keys remembered as answered present; past it, sweeping waits
/// a grace period (the memory would otherwise grow with every backup).
const MAX_TOUCHED: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct GcSettings {
    /// Chunks written or answered present more recently are spared.
    pub grace: Duration,
    /// A pack whose dead fraction is above this is rewritten.
    pub max_unused: f64,
    /// How long a retired pack stays on disk for readers in flight.
    pub retire_delay: Duration,
    /// Pack bytes a compaction copies per second at most.
    pub rate_bytes_per_s: u64,
}

impl Default for GcSettings {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(6 * 3600),
            max_unused: 0.1,
            retire_delay: Duration::from_secs(300),
            rate_bytes_per_s: 64 << 20,
        }
    }
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub live_chunks: u64,
    pub swept_chunks: u64,
    pub swept_bytes: u64,
    pub packs_rewritten: u64,
    pub packs_deleted: u64,
    /// Pack bytes retired minus the bytes their live chunks took again.
    pub reclaimed_bytes: u64,
    pub accounts_skipped: u64,
    /// The sweep waited: the server started, or remembered too many
    /// present answers, less than a grace period ago.
    pub sweep_deferred: bool,
    pub duration_ms: u64,
    /// Of which marking and sweeping, and compacting.
    pub sweep_ms: u64,
    pub compact_ms: u64,
}

/// Chunk keys `MissingChunks` answered present, with when.
#[derive(Default)]
pub(super) struct Touched {
    at: HashMap<ChunkKey, i64>,
    overflow_at: i64,
    /// Chunks answered present since the server started: uploads that
    /// deduplication saved.
    answered: u64,
}

impl Touched {
    pub(super) fn note(&mut self, account: AccountId, ids: &[ChunkId], now: i64) {
        self.answered += ids.len() as u64;
        for id in ids {
            if self.at.len() >= MAX_TOUCHED && !self.at.contains_key(&(account.0, *id.as_bytes())) {
                self.overflow_at = now;
                return;
            }
            self.at.insert((account.0, *id.as_bytes()), now);
        }
    }

    /// Answered after `cutoff`: with no grace period, nothing is recent.
    fn recent(&self, key: &ChunkKey, cutoff: i64) -> bool {
        self.at.get(key).is_some_and(|&t| t > cutoff)
    }
}

impl Store {
    /// Remembers that `ids` were answered present to `account` just now.
    pub fn touch(&self, account: AccountId, ids: &[ChunkId]) -> Result<(), StoreError> {
        lock(&self.touched)?.note(account, ids, super::snapshots::now_ms());
        Ok(())
    }

    /// Chunks `MissingChunks` has answered present since the server
    /// started.
    pub fn answered_present(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.touched)?.answered)
    }

    /// One garbage collection round; rounds never overlap.
    pub fn collect_garbage(&self, settings: &GcSettings) -> Result<GcReport, StoreError> {
        self.collect_garbage_at(settings, super::snapshots::now_ms(), &|| {})
    }

    /// A round as of `now` (unix ms), calling `raced` between listing an
    /// account's dead chunks and sweeping them: where a concurrent commit
    /// hurts most, so tests put one there.
    pub(super) fn collect_garbage_at(
        &self,
        settings: &GcSettings,
        now: i64,
        raced: &dyn Fn(),
    ) -> Result<GcReport, StoreError> {
        let _round = lock(&self.gc_round)?;
        let started = Instant::now();
        let cutoff = now - millis(settings.grace);
        let mut report = GcReport::default();
        {
            let mut touched = lock(&self.touched)?;
            touched.at.retain(|_, t| *t > cutoff);
            report.sweep_deferred = self.opened_ms > cutoff || touched.overflow_at >= cutoff;
        }
        if !report.sweep_deferred {
            self.sweep(cutoff, &mut report, raced)?;
        }
        report.sweep_ms = elapsed_ms(started);
        self.compact(settings, &mut report)?;
        // Packs this round retired count from when they were retired.
        let now = now.max(super::snapshots::now_ms());
        self.delete_retired(now - millis(settings.retire_delay), &mut report)?;
        report.duration_ms = elapsed_ms(started);
        report.compact_ms = report.duration_ms.saturating_sub(report.sweep_ms);
        let txn = self.db.begin_write()?;
        add_counter(
            &mut txn.open_table(META)?,
            RECLAIMED_BYTES,
            report.reclaimed_bytes,
        )?;
        txn.commit()?;
        Ok(report)
    }

    fn sweep(&self, cutoff: i64, report: &mut GcReport, raced: &dyn Fn()) -> Result<(), StoreError> {
        let (mut since, mut young) = {
            let txn = self.db.begin_read()?;
            let feed = txn.open_table(FEED)?;
            let last = tables::last_seq_in(&feed)?;
            (last, young_chunks(&feed, cutoff)?)
        };
        let accounts: Vec<u64> = {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(ACCOUNTS)?;
            let mut out = Vec::new();
            for entry in table.iter()? {
                out.push(entry?.0.value());
            }
            out
        };
        for account in accounts.into_iter().map(AccountId) {
            let Some(mut live) = self.mark(account)? else {
                report.accounts_skipped += 1;
                continue;
            };
            report.live_chunks += live.len() as u64;
            let dead = self.dead_entries(account, &live, &young, cutoff)?;
            raced();
            for batch in dead.chunks(SWEEP_BATCH) {
                let mut pass = Pass {
                    account,
                    since: &mut since,
                    live: &mut live,
                    young: &mut young,
                    cutoff,
                };
                self.sweep_batch(&mut pass, batch, report)?;
            }
        }
        Ok(())
    }

    /// The chunks `account`'s snapshots keep alive, or None when one of
    /// them predates reference blobs.
    fn mark(&self, account: AccountId) -> Result<Option<HashSet<[u8; 32]>>, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let mut live = HashSet::new();
        for info in self.list_snapshots(account)? {
            let known = references::each_live(&chunks, &self.packs_dir, account, &info, |id| {
                live.insert(*id.as_bytes());
            })?;
            if !known {
                return Ok(None);
            }
        }
        Ok(Some(live))
    }

    fn dead_entries(
        &self,
        account: AccountId,
        live: &HashSet<[u8; 32]>,
        young: &HashSet<ChunkKey>,
        cutoff: i64,
    ) -> Result<Vec<(ChunkKey, ChunkLocTuple)>, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let touched = lock(&self.touched)?;
        let mut dead = Vec::new();
        for entry in chunks.range((account.0, [0u8; 32])..=(account.0, [0xffu8; 32]))? {
            let (k, v) = entry?;
            let key = k.value();
            if !live.contains(&key.1) && !young.contains(&key) && !touched.recent(&key, cutoff) {
                dead.push((key, v.value()));
            }
        }
        Ok(dead)
    }

    fn sweep_batch(
        &self,
        pass: &mut Pass<'_>,
        batch: &[(ChunkKey, ChunkLocTuple)],
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let mut freed = 0u64;
        {
            let mut chunks = txn.open_table(CHUNKS)?;
            catch_up(&txn.open_table(FEED)?, &chunks, &self.packs_dir, pass)?;
            let touched = lock(&self.touched)?;
            for (key, loc) in batch {
                let spared = pass.live.contains(&key.1)
                    || pass.young.contains(key)
                    || touched.recent(key, pass.cutoff);
                let unchanged = chunks.get(*key)?.is_some_and(|v| v.value() == *loc);
                if spared || !unchanged {
                    continue;
                }
                chunks.remove(*key)?;
                freed += u64::from(loc.2);
                report.swept_chunks += 1;
            }
        }
        super::usage::sub_bytes(&txn, pass.account, freed)?;
        {
            let mut meta = txn.open_table(META)?;
            let stored = tables::counter(&meta, tables::STORED_BYTES)?;
            meta.insert(
                tables::STORED_BYTES,
                stored.saturating_sub(freed).to_le_bytes().as_slice(),
            )?;
            add_counter(&mut meta, SWEPT_BYTES, freed)?;
            let mut reclaimed = txn.open_table(RECLAIMED)?;
            let before = reclaimed.get(pass.account.0)?.map_or(0, |v| v.value());
            reclaimed.insert(pass.account.0, before + freed)?;
        }
        txn.commit()?;
        report.swept_bytes += freed;
        Ok(())
    }

    /// Rewrites packs with too much dead space and retires packs with
    /// nothing live.
    fn compact(&self, settings: &GcSettings, report: &mut GcReport) -> Result<(), StoreError> {
        // Listed before the active set is read, and that before the index:
        // a listed pack not being written then has all its entries
        // committed by the time the index is read.
        let files = list_packs(&self.packs_dir)?;
        let active = lock(&self.active)?.clone();
        let (live_bytes, retired) = {
            let txn = self.db.begin_read()?;
            let mut live: HashMap<u64, u64> = HashMap::new();
            for entry in txn.open_table(CHUNKS)?.iter()? {
                let loc = entry?.1.value();
                *live.entry(loc.0).or_default() += u64::from(loc.2);
            }
            let mut retired = HashSet::new();
            for entry in txn.open_table(RETIRED)?.iter()? {
                retired.insert(entry?.0.value());
            }
            (live, retired)
        };
        let mut empty = Vec::new();
        let mut sparse = Vec::new();
        for (pack, size) in files {
            if active.contains(&pack) || retired.contains(&pack) || size == 0 {
                continue;
            }
            let live = live_bytes.get(&pack).copied().unwrap_or(0);
            if live == 0 {
                empty.push((pack, size));
            } else if (size.saturating_sub(live)) as f64 > settings.max_unused * size as f64 {
                sparse.push((pack, size));
            }
        }
        self.retire(&empty, report)?;
        if sparse.is_empty() {
            return Ok(());
        }
        let mut entries = self.entries_in(&sparse)?;
        let mut pacer = Pacer::new(settings.rate_bytes_per_s);
        let mut group = Vec::new();
        let mut group_entries = Vec::new();
        let mut group_live = 0;
        for (pack, size) in sparse {
            group_live += live_bytes.get(&pack).copied().unwrap_or(0);
            group.push((pack, size));
            group_entries.extend(entries.remove(&pack).unwrap_or_default());
            if group_live >= super::MAX_PACK_BYTES {
                let (packs, moving) = (std::mem::take(&mut group), std::mem::take(&mut group_entries));
                self.rewrite(&packs, &moving, &mut pacer, report)?;
                group_live = 0;
            }
        }
        if !group.is_empty() {
            self.rewrite(&group, &group_entries, &mut pacer, report)?;
        }
        Ok(())
    }

    /// The index entries pointing into `packs`, by pack, in one scan.
    fn entries_in(
        &self,
        packs: &[(u64, u64)],
    ) -> Result<HashMap<u64, Vec<(ChunkKey, ChunkLocTuple)>>, StoreError> {
        let mut out: HashMap<u64, Vec<_>> = packs.iter().map(|p| (p.0, Vec::new())).collect();
        let txn = self.db.begin_read()?;
        for entry in txn.open_table(CHUNKS)?.iter()? {
            let (k, v) = entry?;
            if let Some(list) = out.get_mut(&v.value().0) {
                list.push((k.value(), v.value()));
            }
        }
        Ok(out)
    }

    /// Copies the live chunks of `packs` (their index `entries`) into one
    /// new pack, then re-points the index and retires the old packs in one
    /// transaction.
    fn rewrite(
        &self,
        packs: &[(u64, u64)],
        entries: &[(ChunkKey, ChunkLocTuple)],
        pacer: &mut Pacer,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let mut writer = self.begin_cold_pack()?;
        let mut written_back = 0;
        let mut keep = HashSet::new();
        let mut reader = packs::PackReader::default();
        for (key, loc) in entries {
            let id = ChunkId::from(key.1);
            let old = ChunkLoc::from_tuple(*loc);
            let intact = reader.read(&self.packs_dir, &old).is_ok()
                && codec::check_stored(id, &old.hash, &reader.buf).is_ok();
            if !intact {
                // Copying a damaged chunk would not mend it: its pack stays
                // where repair can find it.
                tracing::warn!(chunk = %id, pack = old.pack, "not compacting a pack holding a damaged chunk");
                keep.insert(old.pack);
                continue;
            }
            pacer.spend(reader.buf.len() as u64);
            writer.add_checked(AccountId(key.0), id, old.hash, &reader.buf)?;
            if writer.written() - written_back >= WRITE_BACK_EVERY {
                writer.write_back()?;
                written_back = writer.written();
            }
        }
        let moved = writer.sync()?;
        let written = writer.written();
        let now = super::snapshots::now_ms();
        let txn = self.db.begin_write()?;
        let mut retired_bytes = 0;
        {
            let mut chunks = txn.open_table(CHUNKS)?;
            let old: HashMap<ChunkKey, ChunkLocTuple> = entries.iter().copied().collect();
            for m in &moved {
                let key = (m.account.0, *m.id.as_bytes());
                // Swept or moved since it was read: leave it be.
                let same = chunks
                    .get(key)?
                    .is_some_and(|v| Some(&v.value()) == old.get(&key));
                if same {
                    chunks.insert(key, m.loc.to_tuple())?;
                }
            }
            let mut retired = txn.open_table(RETIRED)?;
            for (pack, size) in packs.iter().filter(|p| !keep.contains(&p.0)) {
                retired.insert(*pack, now)?;
                retired_bytes += size;
                report.packs_rewritten += 1;
            }
        }
        txn.commit()?;
        report.reclaimed_bytes += retired_bytes.saturating_sub(written);
        Ok(())
    }

    fn retire(&self, packs: &[(u64, u64)], report: &mut GcReport) -> Result<(), StoreError> {
        if packs.is_empty() {
            return Ok(());
        }
        let now = super::snapshots::now_ms();
        let txn = self.db.begin_write()?;
        {
            let mut retired = txn.open_table(RETIRED)?;
            for (pack, _) in packs {
                retired.insert(*pack, now)?;
            }
        }
        txn.commit()?;
        report.reclaimed_bytes += packs.iter().map(|p| p.1).sum::<u64>();
        Ok(())
    }

    /// Deletes the retired packs retired at or before `before` (unix ms).
    fn delete_retired(&self, before: i64, report: &mut GcReport) -> Result<(), StoreError> {
        let due: Vec<u64> = {
            let txn = self.db.begin_read()?;
            let mut out = Vec::new();
            for entry in txn.open_table(RETIRED)?.iter()? {
                let (k, v) = entry?;
                if v.value() <= before {
                    out.push(k.value());
                }
            }
            out
        };
        if due.is_empty() {
            return Ok(());
        }
        for pack in &due {
            remove_pack(&self.packs_dir, *pack)?;
        }
        fsync_dir(&self.packs_dir)?;
        let txn = self.db.begin_write()?;
        {
            let mut retired = txn.open_table(RETIRED)?;
            for pack in &due {
                retired.remove(*pack)?;
            }
        }
        txn.commit()?;
        report.packs_deleted += due.len() as u64;
        Ok(())
    }

    /// On start, with nothing in flight: deletes every retired pack and
    /// every pack file no index entry names. Returns how many it deleted.
    pub(super) fn recover_packs(&self) -> Result<u64, StoreError> {
        let mut report = GcReport::default();
        self.delete_retired(i64::MAX, &mut report)?;
        let named: HashSet<u64> = {
            let txn = self.db.begin_read()?;
            let mut named = HashSet::new();
            for entry in txn.open_table(CHUNKS)?.iter()? {
                named.insert(entry?.1.value().0);
            }
            named
        };
        let mut removed = report.packs_deleted;
        for (pack, _) in list_packs(&self.packs_dir)? {
            if !named.contains(&pack) {
                remove_pack(&self.packs_dir, pack)?;
                removed += 1;
            }
        }
        if removed > 0 {
            fsync_dir(&self.packs_dir)?;
        }
        Ok(removed)
    }

    /// Chunk bytes swept from each account, ever.
    pub fn reclaimed_by_account(&self) -> Result<BTreeMap<u64, u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = BTreeMap::new();
        for entry in txn.open_table(RECLAIMED)?.iter()? {
            let (k, v) = entry?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// (chunk bytes swept, pack bytes reclaimed on disk), ever.
    pub fn gc_totals(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok((
            tables::counter(&meta, SWEPT_BYTES)?,
            tables::counter(&meta, RECLAIMED_BYTES)?,
        ))
    }

    /// Bytes of pack files on disk.
    pub fn pack_bytes(&self) -> Result<u64, StoreError> {
        Ok(list_packs(&self.packs_dir)?.iter().map(|p| p.1).sum())
    }
}

/// One account's sweep: what is live and young, and how far the feed has
/// been read for snapshots and chunks added since the mark.
struct Pass<'a> {
    account: AccountId,
    since: &'a mut Seq,
    live: &'a mut HashSet<[u8; 32]>,
    young: &'a mut HashSet<ChunkKey>,
    cutoff: i64,
}

/// Adds what the feed recorded after `pass.since` to the live and young
/// sets: run inside each sweep transaction, so a snapshot committed after
/// the mark is seen before anything it names is removed.
fn catch_up(
    feed: &impl ReadableTable<u64, &'static [u8]>,
    chunks: &Table<'_, ChunkKey, ChunkLocTuple>,
    packs_dir: &Path,
    pass: &mut Pass<'_>,
) -> Result<(), StoreError> {
    for entry in feed.range(pass.since.0 + 1..)? {
        let (k, v) = entry?;
        *pass.since = Seq(k.value());
        let rec = super::mirror::decode_record(v.value())?;
        match rec.change {
            Some(change_record::Change::Chunk(c)) => {
                if let Ok(id) = ChunkId::from_bytes(&c.id) {
                    pass.young.insert((rec.account_id, *id.as_bytes()));
                }
            }
            Some(change_record::Change::Snapshot(info)) if rec.account_id == pass.account.0 => {
                let live = &mut *pass.live;
                let known = references::each_live(chunks, packs_dir, pass.account, &info, |id| {
                    live.insert(*id.as_bytes());
                })?;
                if !known {
                    return Err(StoreError::Internal(format!(
                        "snapshot {} committed during garbage collection lists no references",
                        info.id
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Chunk keys the feed recorded after `cutoff`, read back from its end.
fn young_chunks(
    feed: &impl ReadableTable<u64, &'static [u8]>,
    cutoff: i64,
) -> Result<HashSet<ChunkKey>, StoreError> {
    let mut young = HashSet::new();
    for entry in feed.iter()?.rev() {
        let (_, v) = entry?;
        let rec = super::mirror::decode_record(v.value())?;
        if rec.time_unix_ms <= cutoff {
            break;
        }
        if let Some(change_record::Change::Chunk(c)) = rec.change
            && let Ok(id) = ChunkId::from_bytes(&c.id)
        {
            young.insert((rec.account_id, *id.as_bytes()));
        }
    }
    Ok(young)
}

/// Pack files in `dir` by id, with their sizes.
fn list_packs(dir: &Path) -> Result<Vec<(u64, u64)>, StoreError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(StoreError::io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io(format!("listing {}", dir.display())))?;
        let name = entry.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".pack")) else {
            continue;
        };
        let Ok(pack) = u64::from_str_radix(hex, 16) else {
            continue;
        };
        let size = entry
            .metadata()
            .map_err(StoreError::io(format!(
                "reading the size of {}",
                entry.path().display()
            )))?
            .len();
        out.push((pack, size));
    }
    Ok(out)
}

fn remove_pack(dir: &Path, pack: u64) -> Result<(), StoreError> {
    let path = packs::pack_path(dir, pack);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StoreError::io(format!("deleting {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn add_counter(
    meta: &mut Table<'_, &'static str, &'static [u8]>,
    key: &str,
    n: u64,
) -> Result<(), StoreError> {
    let total = tables::counter(meta, key)? + n;
    meta.insert(key, total.to_le_bytes().as_slice())?;
    Ok(())
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Keeps a compaction's copying under its byte rate by sleeping.
struct Pacer {
    rate: u64,
    started: Instant,
    spent: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            started: Instant::now(),
            spent: 0,
        }
    }

    fn spend(&mut self, bytes: u64) {
        self.spent += bytes;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.spent as f64 / self.rate as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}
