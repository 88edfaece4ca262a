//! The one place protobuf codegen runs. Everything else imports `duplex_proto::v1`.

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("duplex.v1");
}

/// Encoded `FileDescriptorSet` of every Duplex service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/duplex_descriptor.bin"));

/// Metadata key that carries an account ticket on storage calls.
pub const TICKET_METADATA_KEY: &str = "duplex-ticket-bin";

/// Largest gRPC message any Duplex service sends or accepts: one chunk (at
/// most 8 MiB) plus framing.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A keep policy as the wire carries it and as `duplex_types::retention`
/// applies it: the same six counts.
impl From<v1::KeepPolicy> for duplex_types::retention::KeepPolicy {
    fn from(k: v1::KeepPolicy) -> Self {
        Self {
            last: k.last,
            hourly: k.hourly,
            daily: k.daily,
            weekly: k.weekly,
            monthly: k.monthly,
            yearly: k.yearly,
        }
    }
}

impl From<duplex_types::retention::KeepPolicy> for v1::KeepPolicy {
    fn from(k: duplex_types::retention::KeepPolicy) -> Self {
        Self {
            last: k.last,
            hourly: k.hourly,
            daily: k.daily,
            weekly: k.weekly,
            monthly: k.monthly,
            yearly: k.yearly,
        }
    }
}
