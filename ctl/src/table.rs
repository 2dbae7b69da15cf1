//! Text tables: calicoctl's boxed tables (`+---+` borders) and its plain
//! `calicoctl get` columns.

/// How a column's cells are aligned (headers are always centered in boxes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table of string cells.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these `(header, alignment)` columns.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Self {
            headers: columns.iter().map(|(h, _)| h.to_string()).collect(),
            aligns: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        (0..self.headers.len())
            .map(|c| {
                let cells = self
                    .rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count());
                cells
                    .chain([self.headers[c].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Renders with `+---+` borders, as calicoctl's `ipam show`.
    pub fn boxed(&self) -> String {
        let widths = self.widths();
        let rule: String = widths
            .iter()
            .map(|w| format!("+{}", "-".repeat(w + 2)))
            .collect::<String>()
            + "+\n";
        let mut out = rule.clone();
        for (c, header) in self.headers.iter().enumerate() {
            out.push_str(&format!("| {:^w$} ", header, w = widths[c]));
        }
        out.push_str("|\n");
        out.push_str(&rule);
        for row in &self.rows {
            for (c, width) in widths.iter().enumerate() {
                let cell = row.get(c).map_or("", String::as_str);
                match self.aligns[c] {
                    Align::Left => out.push_str(&format!("| {cell:<width$} ")),
                    Align::Right => out.push_str(&format!("| {cell:>width$} ")),
                }
            }
            out.push_str("|\n");
        }
        out.push_str(&rule);
        out
    }

    /// Renders as space-separated columns, as `calicoctl get`.
    pub fn plain(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let cells: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(c, w)| format!("{:<w$}", line.get(c).map_or("", String::as_str)))
                .collect();
            out.push_str(cells.join("   ").trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_tables_look_like_calicoctl() {
        let mut t = Table::new(&[("GROUPING", Align::Left), ("IPS TOTAL", Align::Right)]);
        t.row(vec!["IP Pool".into(), "65536".into()]);
        assert_eq!(
            t.boxed(),
            "+----------+-----------+\n\
             | GROUPING | IPS TOTAL |\n\
             +----------+-----------+\n\
             | IP Pool  |     65536 |\n\
             +----------+-----------+\n"
        );
    }

    #[test]
    fn plain_tables_align_columns() {
        let mut t = Table::new(&[("NAME", Align::Left), ("CIDR", Align::Left)]);
        t.row(vec!["default-ipv4-ippool".into(), "10.244.0.0/16".into()]);
        assert_eq!(
            t.plain(),
            "NAME                  CIDR\ndefault-ipv4-ippool   10.244.0.0/16\n"
        );
    }
}
