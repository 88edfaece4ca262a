//! The coordinator with fail points armed, for resume tests only: it
//! aborts at the start of the phase named by `DUPLEX_FAILPOINT`
//! (`KIND:PHASE`, e.g. `failover:promote-storage`). Built only with the
//! `failpoints` feature; the shipped `duplex-coordinator` never aborts.
//! Several coordinators share a list of them in `DUPLEX_FAILPOINT_FILE`,
//! each taken by the leader that reaches it.

#[path = "../main.rs"]
mod coordinator;

fn main() -> anyhow::Result<()> {
    duplex_coordinator::engine::arm_failpoints();
    coordinator::main()
}
