//! `tabby`: the CNI interface plugin.
fn main() {
    std::process::exit(tabby_cni::entry::main(tabby_cni::entry::Plugin::Tabby));
}
