//! `dsv3`: inspect and run DeepSeek-V3-architecture models. See `dsv3 --help`.

fn main() {
    let cli = match deepseek_v3::cli::parse_args(std::env::args_os()) {
        Ok(Some(cli)) => cli,
        Ok(None) => return,
        Err(e) => {
            // Under mpirun every rank parses the same arguments: rank 0 alone reports.
            match launcher_rank() {
                Some(r) if r > 0 => std::thread::sleep(std::time::Duration::from_millis(500)),
                _ => deepseek_v3::cli::dist::print_error(None, &e),
            }
            std::process::exit(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match deepseek_v3::cli::run(cli, &mut stdout) {
        Ok(()) => {}
        Err(deepseek_v3::cli::CliError::Reported) => std::process::exit(1),
        Err(e) => {
            // Under mpirun, ranks other than 0 name themselves.
            deepseek_v3::cli::dist::print_error(launcher_rank(), &e.to_string());
            std::process::exit(1);
        }
    }
}

/// This process's rank when a launcher (OpenMPI, MPICH/PMI) started it.
fn launcher_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}
