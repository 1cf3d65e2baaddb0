//! The checked-in diagrams are exactly what the code generates.

use instance_lifecycle::diagram::{Diagram, Format};

fn ensure_file_contents(path: &str, generated: &str, format: &str) {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    let on_disk = std::fs::read_to_string(&full).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{path} differs from what the transition table generates.\nRegenerate it with:\n    cargo run -q --bin lifecycle -- diagram --format {format} > {path}\n"
    );
}

#[test]
fn diagrams_match_the_transition_table() {
    let d = Diagram::from_rules();
    ensure_file_contents("state-diagrams/instance.mmd", &d.render(Format::Mermaid), "mermaid");
    ensure_file_contents("state-diagrams/instance.dot", &d.render(Format::Dot), "dot");
}

#[test]
fn readme_shows_the_current_diagram() {
    let readme = std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap_or_default();
    let mermaid = Diagram::from_rules().render(Format::Mermaid);
    assert!(
        readme.contains(&format!("```mermaid\n{mermaid}```")),
        "README.md's mermaid block differs from state-diagrams/instance.mmd; paste the file into it"
    );
}
