//! Assigns whose writes reach the disk only at `Ipam::sync`
//! (`Ipam::assign_unsynced`, what a CNI ADD uses): what a crash before the
//! sync may leave, and that none of it hands an address to two holders.
//!
//! A crash is played by putting the datastore in the state a lost write
//! leaves (the old document back, or the new one missing), as the fault
//! tests do: a lost rename cannot be caused for real without cutting the
//! power of the machine.

mod common;

use common::backends::{backend_tests, Backend, TestStore};
use common::{problems, v4};
use ipnetwork::IpNetwork;
use tabby_ipam::{
    store, AssignArgs, Datastore, DatastoreError, FileDatastore, Handle, Ipam, WrittenAhead,
};

backend_tests!(
    [mem, file, kubernetes];
    an_unsynced_assign_is_taken_for_another_opening_of_the_store_before_its_sync,
    a_lost_block_write_frees_the_address_but_the_stale_handle_never_releases_its_next_holder,
    a_lost_handle_write_leaves_an_allocation_that_the_repair_gives_back_to_its_handle,
    a_handle_written_ahead_of_the_node_lock_is_not_written_again_under_it,
    a_handle_written_ahead_and_then_rewritten_by_a_repair_is_written_again_under_the_lock,
    a_handle_written_ahead_for_a_block_that_filled_up_meanwhile_is_taken_back,
);

/// A second plugin process of the node assigns while the first has not
/// synced yet: it must not get the same address.
fn an_unsynced_assign_is_taken_for_another_opening_of_the_store_before_its_sync(backend: Backend) {
    let (store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    let (first, unsynced) = ipam
        .assign_unsynced(&v4("net.first", "a"), None)
        .expect("assign");
    assert_eq!(
        unsynced.keys(),
        ["handles/net.first", "blocks/10.1.0.0-26"],
        "the handle and the block are what the sync must make durable"
    );
    let other = Ipam::new(store.open_another());
    let second = other.assign(&v4("net.second", "a")).expect("assign");
    assert_ne!(first[0].ip(), second[0].ip());
    ipam.sync(unsynced).expect("sync");
    assert_eq!(
        ipam.addresses_of("net.first").expect("addresses"),
        [first[0].ip()]
    );
    assert!(problems(ipam.datastore()).is_empty());
}

/// Power lost after the handle's rename reached the disk but not the
/// block's: the address is free again, which is safe since the ADD never
/// answered. The runtime's DEL of that ADD later finds the stale handle:
/// it must release nothing of the address's new holder.
fn a_lost_block_write_frees_the_address_but_the_stale_handle_never_releases_its_next_holder(
    backend: Backend,
) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    ipam.assign(&v4("net.before", "a")).expect("assign");
    let ds = ipam.datastore();
    let key = store::block_key(&"10.1.0.0/26".parse().expect("cidr"));
    let old = ds.get(&key).expect("get").expect("block");

    let (lost, _unsynced) = ipam
        .assign_unsynced(&v4("net.lost", "a"), None)
        .expect("assign");
    let now = ds.get(&key).expect("get").expect("block");
    ds.update(&key, &old.value, &now.revision)
        .expect("the older block comes back");

    let next = ipam.assign(&v4("net.next", "a")).expect("assign");
    assert_eq!(
        next[0].ip(),
        lost[0].ip(),
        "the lost assign's address is free again"
    );
    assert!(
        ipam.release_by_handle("net.lost")
            .expect("release")
            .is_empty(),
        "the stale handle released another handle's address"
    );
    assert_eq!(
        ipam.addresses_of("net.next").expect("addresses"),
        [next[0].ip()]
    );
    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
}

/// Power lost after the block's rename reached the disk but not the
/// handle's: the address stays taken (no other assign gets it) and the
/// repair that GC runs gives it back to its handle, so DEL releases it.
fn a_lost_handle_write_leaves_an_allocation_that_the_repair_gives_back_to_its_handle(
    backend: Backend,
) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    let (lost, _unsynced) = ipam
        .assign_unsynced(&v4("net.lost", "a"), None)
        .expect("assign");
    let ds = ipam.datastore();
    let handle = ds
        .get(&store::handle_key("net.lost"))
        .expect("get")
        .expect("handle");
    ds.delete(&handle.key, &handle.revision)
        .expect("the handle never reached the disk");

    let next = ipam.assign(&v4("net.next", "a")).expect("assign");
    assert_ne!(next[0].ip(), lost[0].ip());
    assert_eq!(problems(ds).len(), 1, "{:?}", problems(ds));
    assert_eq!(ipam.repair_handles(|_, _| true).expect("repair").len(), 1);
    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
    let released = ipam.release_by_handle("net.lost").expect("release");
    assert_eq!(
        released.iter().map(|r| r.ip).collect::<Vec<_>>(),
        [lost[0].ip()]
    );
}

/// What the handle document of `handle` records, block by block.
fn handle_counts(ds: &impl Datastore, handle: &str) -> Vec<(String, u32)> {
    store::get::<Handle>(ds, &store::handle_key(handle))
        .expect("get")
        .map(|d| d.value.block.into_iter().collect())
        .unwrap_or_default()
}

/// `net.pod`'s handle records one address of node `a`'s first block, and
/// the store has nothing wrong.
fn assert_the_pod_holds_one_address_of_the_first_block(ds: &impl Datastore) {
    assert_eq!(
        handle_counts(ds, "net.pod"),
        [("10.1.0.0/26".to_string(), 1)]
    );
    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
}

/// Node `a` gets its first block (for `net.first`), then the handle of
/// `net.pod` is written ahead for it, as an ADD does before the node lock.
fn write_ahead_after_a_first_assign<D: Datastore>(ipam: &Ipam<D>) -> (AssignArgs, WrittenAhead) {
    ipam.assign(&v4("net.first", "a")).expect("assign");
    let args = v4("net.pod", "a");
    let ahead = ipam
        .write_handle_ahead(&args)
        .expect("ahead")
        .expect("a guess");
    (args, ahead)
}

/// The assign under the node lock that uses `ahead`, synced.
fn assign_and_sync<D: Datastore>(
    ipam: &Ipam<D>,
    args: &AssignArgs,
    ahead: WrittenAhead,
) -> Vec<IpNetwork> {
    let (got, unsynced) = ipam.assign_unsynced(args, Some(ahead)).expect("assign");
    ipam.sync(unsynced).expect("sync");
    got
}

/// The ADD path: the handle is written before the node lock, and the
/// assign under the lock writes only the block.
fn a_handle_written_ahead_of_the_node_lock_is_not_written_again_under_it(backend: Backend) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    assert!(
        ipam.write_handle_ahead(&v4("net.pod", "a"))
            .expect("ahead")
            .is_none(),
        "the node has no block yet: nothing to guess"
    );
    let (args, ahead) = write_ahead_after_a_first_assign(&ipam);
    let ds = ipam.datastore();
    let written = ds.get("handles/net.pod").expect("get").expect("handle");
    let got = assign_and_sync(&ipam, &args, ahead);
    let after = ds.get("handles/net.pod").expect("get").expect("handle");
    assert_eq!(
        after.revision, written.revision,
        "the handle was written again under the lock"
    );
    assert_the_pod_holds_one_address_of_the_first_block(ds);
    let released = ipam.release_by_handle("net.pod").expect("release");
    assert_eq!(
        released.iter().map(|r| r.ip).collect::<Vec<_>>(),
        [got[0].ip()]
    );
}

/// A GC between the write ahead and the node lock repairs the handle,
/// which holds nothing yet, away: the assign must write it again, or the
/// address would have no handle.
fn a_handle_written_ahead_and_then_rewritten_by_a_repair_is_written_again_under_the_lock(
    backend: Backend,
) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 26);
    let (args, ahead) = write_ahead_after_a_first_assign(&ipam);
    assert_eq!(ipam.repair_handles(|_, _| true).expect("repair").len(), 1);
    assert!(handle_counts(ipam.datastore(), "net.pod").is_empty());
    let got = assign_and_sync(&ipam, &args, ahead);
    let ds = ipam.datastore();
    assert_the_pod_holds_one_address_of_the_first_block(ds);
    assert_eq!(
        ipam.release_by_handle("net.pod").expect("release").len(),
        1,
        "{:?} is not released by its handle",
        got
    );
}

/// Other pods of the node take the guessed block's last addresses before
/// the node lock: the assign claims another block, and the handle records
/// that block only.
fn a_handle_written_ahead_for_a_block_that_filled_up_meanwhile_is_taken_back(backend: Backend) {
    let (_store, ipam) = TestStore::with_pool(backend, "10.1.0.0/24", 29);
    let (args, ahead) = write_ahead_after_a_first_assign(&ipam);
    for i in 0..7 {
        ipam.assign(&v4(&format!("net.other{i}"), "a"))
            .expect("assign");
    }
    let got = assign_and_sync(&ipam, &args, ahead);
    let ds = ipam.datastore();
    let block = format!("{}/29", got[0].network());
    assert_ne!(block, "10.1.0.0/29");
    assert_eq!(handle_counts(ds, "net.pod"), [(block, 1)]);
    assert!(problems(ds).is_empty(), "{:?}", problems(ds));
}

/// The file backend's sync fsyncs the directory of each key: one that is
/// gone is an error (a sync that did nothing would pass silently).
#[test]
fn the_file_sync_opens_the_directory_of_each_key_and_fails_when_it_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = FileDatastore::open(dir.path()).expect("open");
    ds.create_deferred("handles/h", b"{}").expect("create");
    ds.create_deferred("blocks/b", b"{}").expect("create");
    let keys = ["handles/h".to_string(), "blocks/b".to_string()];
    ds.sync(&keys).expect("sync");
    std::fs::remove_dir_all(dir.path().join("blocks")).expect("remove blocks/");
    let err = ds.sync(&keys).expect_err("a sync of a missing directory");
    assert!(
        matches!(&err, DatastoreError::Unavailable { location, .. } if location.ends_with("blocks")),
        "{err}"
    );
}
