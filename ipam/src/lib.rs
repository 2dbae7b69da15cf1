//! Tabby's IPAM: a cluster-wide pool split into blocks that are affine to
//! nodes, with every allocation owned by a handle.
//!
//! The allocator is written once over the [`Datastore`] trait, whose only
//! write primitive is compare-and-swap on a revision; backends (the `file`
//! and `kubernetes` backends here, `etcd` later) only store documents.
//!
//! Module map:
//! - [`types`]: the stored documents (IPPool, Block, BlockAffinity, Handle, Node).
//! - [`datastore`]: the `Datastore` trait and its error type.
//! - [`file`]: the file backend (one JSON document per key, flock).
//! - [`kubernetes`]: the Kubernetes backend (CRDs `crd.tabby.dev/v1`, Node annotations).
//! - [`config`]: `{"type":"file"|"kubernetes",...}` to a backend, in one place.
//! - [`mem`]: an in-memory backend for tests.
//! - [`block`]: pure block arithmetic and the per-block allocation table.
//! - [`allocator`]: assign / release / gc over a datastore, with retries on conflict.
//! - [`claim`]: the two-phase block claim (pending -> confirmed affinity).
//! - [`fixed`]: assigning one named address (a pod's `tabby.dev/ipAddrs`).
//! - [`pools`]: pool validation and management, cluster settings.
//! - [`repair`]: GC, and the repair of what crashed writers leave (orphan handles, dead claims).
//! - [`store`]: document keys and typed JSON access.
//! - [`report`]: usage and consistency reports for `tabbyctl ipam show|check`.

pub mod allocator;
pub mod block;
pub mod claim;
pub mod config;
pub mod datastore;
pub mod file;
pub mod fixed;
pub mod kubernetes;
pub mod lock;
pub mod mem;
pub mod pools;
pub mod repair;
pub mod report;
pub mod resources;
pub mod store;
pub mod types;

pub use allocator::{AssignArgs, Ipam, IpamError, Released, Unsynced, WrittenAhead};
pub use config::{datastore_from_config, DatastoreConfig};
pub use datastore::{Datastore, DatastoreError, Revision};
pub use file::FileDatastore;
pub use file::DEFAULT_PATH;
pub use kubernetes::{KubeDatastore, KubeOptions};
pub use lock::NodeLock;
pub use mem::MemDatastore;
pub use repair::HandleRepair;
pub use types::{
    AffinityState, AllocationAttribute, Block, BlockAffinity, EncapMode, Handle, IpPool,
    IpamConfig, Node,
};

/// `err: cause: cause...`: an error with its whole source chain, for logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
