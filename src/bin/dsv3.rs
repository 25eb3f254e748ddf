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
    match deepseek_v3::cli::run(cli, &mut stdout) {
        Ok(()) => {}
        Err(deepseek_v3::cli::CliError::OtherRank) => std::process::exit(1),
        Err(e) => {
            // Under mpirun, ranks other than 0 name themselves.
            match ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
                .iter()
                .find_map(|v| std::env::var(v).ok())
                .filter(|r| r != "0")
            {
                Some(rank) => eprintln!("error (rank {rank}): {e}"),
                None => eprintln!("error: {e}"),
            }
            std::process::exit(1);
        }
    }
}
