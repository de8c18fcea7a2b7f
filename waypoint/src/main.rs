//! The `waypoint` binary.

fn main() {
    eprintln!("waypoint: not yet wired");
    std::process::exit(1);
}
