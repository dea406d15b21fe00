//! `sqlx::migrate!` embeds `migrations/` at compile time but cannot tell
//! Cargo to watch it; without this a new migration file is silently left out
//! of the binaries and the test template until something else rebuilds the
//! crate (sqlx's documented workaround).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
