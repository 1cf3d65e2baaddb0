//! `lifecycle diagram`: the state diagram generated from the rules, as
//! Mermaid or DOT text, or rendered by Graphviz.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use instance_lifecycle::diagram::{Diagram, Format};
use instance_lifecycle::log::Event;

use crate::output::{Failure, fail, say};

pub fn run(
    dot: bool,
    from_log: Option<PathBuf>,
    svg: Option<PathBuf>,
    png: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let mut d = Diagram::from_rules();
    if let Some(dir) = from_log {
        d.annotated = true;
        let log = crate::read::open_copy(&dir)?;
        for record in log.records() {
            let record = record?;
            if let Event::Transition { from, input, .. } = &record.event {
                d.count(from.state.kind(), record.to.state.kind(), input.kind());
            }
        }
    }
    let render = match (svg, png) {
        (Some(path), _) => Some(("svg", path)),
        (None, Some(path)) => Some(("png", path)),
        (None, None) => None,
    };
    let Some((kind, path)) = render else {
        let text = d.render(if dot { Format::Dot } else { Format::Mermaid });
        say!("{}", text.trim_end());
        return Ok(ExitCode::SUCCESS);
    };
    let mut child = std::process::Command::new("dot")
        .arg(format!("-T{kind}"))
        .arg("-o")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|_| fail("Graphviz `dot` is not installed; install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz) or use --format dot"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(d.render(Format::Dot).as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(fail(format!("dot failed with {status}")));
    }
    eprintln!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}
