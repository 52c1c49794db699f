//! `paligemma`: parse the arguments, run, print one-line errors with exit code 2.

use clap::Parser;

fn main() {
    let args = paligemma::cli::Args::parse();
    let code = match paligemma::cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, as a user reads it.
            let message: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", message.join(": ").replace('\n', " "));
            2
        }
    };
    std::process::exit(code);
}
