//! Tables for people (scripts read `--json`): columns as wide as their
//! widest cell, two spaces apart, no borders, nothing wrapped.

use comfy_table::{ContentArrangement, Table, presets};

/// `header` and `rows` as aligned text, each line ending in a newline.
pub fn render<R, C>(header: &[&str], rows: R) -> String
where
    R: IntoIterator<Item = Vec<C>>,
    C: ToString,
{
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_to_the_widest_cell() {
        let text = super::render(
            &["name", "role"],
            [vec!["storage-a", "primary"], vec!["b", "replica"]],
        );
        assert_eq!(text, "name       role\nstorage-a  primary\nb          replica\n");
    }
}
