//! `dsv3`: inspect and run DeepSeek-V3-architecture models. See `dsv3 --help`.

use clap::Parser;

fn main() {
    let cli = deepseek_v3::cli::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = deepseek_v3::cli::run(cli, &mut stdout) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
