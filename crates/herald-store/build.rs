//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the migration
//! directories at compile time, and cargo only sees changes to files it was told about.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
