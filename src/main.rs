//! `paligemma`: parse the arguments, run, print one-line errors with exit code 2.

use clap::Parser;
use paligemma::cli::{self, Args, BenchArgs};
#[cfg(feature = "serve")]
use paligemma::serve::command::{self as serve, ServeArgs};

fn main() {
    // `paligemma bench ...`, `paligemma serve ...`, or the plain run.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let outcome = match argv.get(1).and_then(|a| a.to_str()) {
        Some("bench") => cli::bench(BenchArgs::parse_from(&argv[1..])),
        #[cfg(feature = "serve")]
        Some("serve") => serve::command(ServeArgs::parse_from(&argv[1..])),
        #[cfg(not(feature = "serve"))]
        Some("serve") => Err(anyhow::anyhow!(
            "this binary was built without the HTTP server (cargo feature `serve`); rebuild with default features"
        )),
        _ => cli::run(Args::parse_from(argv)),
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
