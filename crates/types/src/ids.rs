use std::fmt;

use crate::InvalidInput;

/// BLAKE3 of a chunk's uncompressed content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    pub fn of(content: &[u8]) -> Self {
        Self(*blake3::hash(content).as_bytes())
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidInput> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| InvalidInput::Length {
            what: "chunk id",
            expected: 32,
            got: bytes.len(),
        })?;
        Ok(Self(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_vec(self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl From<[u8; 32]> for ChunkId {
    fn from(value: [u8; 32]) -> Self {
        Self(value)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// A server's stable identity, generated on first start.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ServerId(uuid::Uuid);

impl ServerId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidInput::Malformed {
                what: "server id",
                value: s.to_owned(),
                reason: "expected a uuid",
            })
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A snapshot's id: a uuid v7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SnapshotId([u8; 16]);

impl SnapshotId {
    pub fn generate() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        uuid::Uuid::try_parse(s)
            .map(|u| Self(*u.as_bytes()))
            .map_err(|_| InvalidInput::Malformed {
                what: "snapshot id",
                value: s.to_owned(),
                reason: "expected 32 hex digits",
            })
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes(self.0).simple().fmt(f)
    }
}

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
        pub struct $name(pub u64);

        impl $name {
            pub fn next(self) -> Self {
                Self(self.0 + 1)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

counter!(
    /// An account, numbered by the master account server.
    AccountId
);
counter!(
    /// Raised by the coordinator on every role change; only ever grows.
    Epoch
);

impl Epoch {
    /// An epoch a role grant may carry. `u64::MAX` is refused: nothing
    /// could ever follow it, so a server holding it could never be fenced
    /// by a later grant.
    pub fn granted(raw: u64) -> Result<Epoch, crate::InvalidInput> {
        if raw == u64::MAX {
            return Err(crate::InvalidInput::Malformed {
                what: "epoch",
                value: raw.to_string(),
                reason: "no grant can carry the largest epoch (no later one could follow it)",
            });
        }
        Ok(Epoch(raw))
    }
}
counter!(
    /// Position in the account server's transaction log.
    Lsn
);
counter!(
    /// Position in a storage server's change feed.
    Seq
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_rejects_wrong_length() {
        assert!(ChunkId::from_bytes(&[0u8; 31]).is_err());
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::from_bytes(id.as_bytes()), Ok(id));
    }

    #[test]
    fn snapshot_ids_round_trip_and_sort_by_time() {
        let a = SnapshotId::generate();
        let b = SnapshotId::generate();
        assert!(a < b);
        assert_eq!(SnapshotId::parse(&a.to_string()), Ok(a));
        assert!(SnapshotId::parse("nope").is_err());
    }
}
