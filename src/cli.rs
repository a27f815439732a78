//! Command-line options, parsed in one place and handed down as plain structs.

pub fn main() -> i32 {
    // Hidden helper subcommands run first: they must stay single-threaded.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = crate::sandbox::helper::dispatch(&args) {
        return code;
    }
    0
}
