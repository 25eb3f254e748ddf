//! `dsv3`: inspect and run DeepSeek-V3-architecture models. See `dsv3 --help`.

fn main() {
    let cli = match deepseek_v3::cli::parse_args(std::env::args_os()) {
        Ok(Some(cli)) => cli,
        Ok(None) => return,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = deepseek_v3::cli::run(cli, &mut stdout) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
