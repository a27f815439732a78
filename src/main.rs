fn main() {
    std::process::exit(sandrun::cli::main());
}
