//! Prints the path of a built test guest, so scripts (the README's demo, benchmarks) can boot
//! the same images the tests use: `test-guest-path hello`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: test-guest-path NAME   (guests: {})", names());
        return ExitCode::from(2);
    };
    match test_guests::guest_path(&name) {
        Some(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("no test guest called {name:?}; the guests are: {}", names());
            ExitCode::from(2)
        }
    }
}

fn names() -> String {
    test_guests::ALL
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}
