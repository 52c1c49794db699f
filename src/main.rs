//! `paligemma`: parse the arguments, run, print one-line errors with exit code 2.

use paligemma::cli::{self, Command};

fn main() {
    let outcome = match cli::parse() {
        Command::Run(args) => cli::run(args),
        Command::Bench(args) => cli::bench(args),
        Command::Serve(args) => cli::serve(args),
    };
    let code = match outcome {
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
