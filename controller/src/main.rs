//! `weft-controller`: Weft's control plane (being built).

fn main() {}
