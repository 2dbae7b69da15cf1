//! `tabby-ipam`: the CNI IPAM plugin (block IPAM on Tabby's datastore).
fn main() {
    std::process::exit(tabby_cni::entry::main(tabby_cni::entry::Plugin::TabbyIpam));
}
