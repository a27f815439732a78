//! Command-line options, parsed in one place and handed down as plain structs.

pub fn main() -> i32 {
    0
}
