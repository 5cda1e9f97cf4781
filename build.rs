// `sqlx::migrate!` embeds migrations/ at compile time; without this, adding a migration leaves an incremental
// build with the old set (sqlx's own advice for stable Rust).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
