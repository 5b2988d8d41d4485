//! How the client CLI prints records and statuses (`--output`): JSON, one object per line (the
//! default, what scripts read), or a table for people, with times as `2026-12-07 12:00:03Z`.
//!
//! A command builds each item as the JSON object it prints in JSON; a table shows some of its
//! keys as columns, so the two never disagree.

use std::io::Write;

use serde_json::Value;

/// The output format of the commands that print records and statuses.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// One JSON object per line, times in RFC 3339.
    #[default]
    Json,
    /// Aligned columns with a header, times as `2026-12-07 12:00:03Z`.
    Table,
}

/// How a column shows its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// As it is: text as text, other values as JSON, a list joined by commas.
    Plain,
    /// An RFC 3339 time, to the second, with a space for the `T`.
    Time,
    /// A list of objects, by their `name`s (an object's fields).
    Names,
    /// Record errors (`index`, `field`, `reason`), each as `#INDEX FIELD: REASON`.
    RecordErrors,
}

/// A column of a table: its title, the key of the JSON object it shows, and how.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    title: &'static str,
    key: &'static str,
    kind: Kind,
}

/// A column showing `key` as it is.
pub const fn col(title: &'static str, key: &'static str) -> Column {
    Column { title, key, kind: Kind::Plain }
}

/// A column showing `key` as a time.
pub const fn time(title: &'static str, key: &'static str) -> Column {
    Column { title, key, kind: Kind::Time }
}

/// A column showing `key` as `kind` says.
pub const fn shown(title: &'static str, key: &'static str, kind: Kind) -> Column {
    Column { title, key, kind }
}

/// Prints the items of one command: each JSON line at once, or the table once every row is in
/// ([`Printer::finish`]), or, for a stream that does not end, each row as it comes
/// ([`Printer::streaming`]).
#[derive(Debug)]
pub struct Printer {
    output: Output,
    columns: &'static [Column],
    rows: Vec<Vec<String>>,
    /// Rows are printed as they come (widths grow, and earlier rows are not realigned).
    streaming: Option<Vec<usize>>,
}

impl Printer {
    /// A printer of items whose table shows `columns`.
    pub fn new(output: Output, columns: &'static [Column]) -> Self {
        Self { output, columns, rows: Vec::new(), streaming: None }
    }

    /// A printer for a stream that does not end (`link watch`): a table row is printed as soon
    /// as its item comes.
    pub fn streaming(output: Output, columns: &'static [Column]) -> Self {
        Self { output, columns, rows: Vec::new(), streaming: Some(Vec::new()) }
    }

    /// Prints `item` (as a JSON line), or adds it to the table.
    pub fn print(&mut self, item: &Value) -> anyhow::Result<()> {
        match self.output {
            Output::Json => crate::client::print_json(item),
            Output::Table => {
                let row: Vec<String> = self.columns.iter().map(|c| cell(item.get(c.key), c.kind)).collect();
                match &mut self.streaming {
                    None => self.rows.push(row),
                    Some(widths) => {
                        let mut out = std::io::stdout().lock();
                        if widths.is_empty() {
                            // the header: a time's width, or at least 12 (or the title's)
                            widths.extend(self.columns.iter().map(|c| match c.kind {
                                Kind::Time => HUMAN_TIME_WIDTH,
                                _ => c.title.len().max(12),
                            }));
                            let header: Vec<String> = self.columns.iter().map(|c| c.title.to_owned()).collect();
                            write_row(&mut out, &header, widths)?;
                        }
                        for (width, text) in widths.iter_mut().zip(&row) {
                            *width = (*width).max(text.chars().count());
                        }
                        write_row(&mut out, &row, widths)?;
                        out.flush()?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Prints the table (nothing more in JSON).
    pub fn finish(self) -> anyhow::Result<()> {
        if self.output != Output::Table || self.streaming.is_some() {
            return Ok(());
        }
        let header: Vec<String> = self.columns.iter().map(|c| c.title.to_owned()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (width, text) in widths.iter_mut().zip(row) {
                *width = (*width).max(text.chars().count());
            }
        }
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        write_row(&mut out, &header, &widths)?;
        for row in &self.rows {
            write_row(&mut out, row, &widths)?;
        }
        out.flush()?;
        Ok(())
    }
}

/// One line of a table: the cells padded to their widths, two spaces apart, the last unpadded.
fn write_row(out: &mut impl Write, cells: &[String], widths: &[usize]) -> std::io::Result<()> {
    let mut line = String::new();
    for (i, (text, width)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            line.push_str(text);
        } else {
            line.push_str(&format!("{text:<width$}  "));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// A value as a table cell: on one line, `-` when there is nothing.
fn cell(value: Option<&Value>, kind: Kind) -> String {
    let text = match (value, kind) {
        (None | Some(Value::Null), _) => String::new(),
        (Some(Value::String(s)), Kind::Time) => human_time(s),
        (Some(Value::Array(items)), Kind::Names) => {
            items.iter().filter_map(|i| i.get("name").and_then(Value::as_str)).collect::<Vec<_>>().join(",")
        }
        (Some(Value::Array(items)), Kind::RecordErrors) => items
            .iter()
            .map(|e| {
                let text = |key| e.get(key).map(plain).unwrap_or_default();
                match text("field").as_str() {
                    "" => format!("#{} {}", text("index"), text("reason")),
                    field => format!("#{} {field}: {}", text("index"), text("reason")),
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        (Some(v), _) => plain(v),
    };
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.is_empty() { "-".to_owned() } else { text }
}

/// A value as text: a string as it is, a list joined by commas, anything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The width of a time as a table shows it, `2026-12-07 12:00:03Z`.
const HUMAN_TIME_WIDTH: usize = 20;

/// An RFC 3339 time (`2026-12-07T12:00:03.250Z`) to the second, with a space for the `T`
/// (`2026-12-07 12:00:03Z`); anything else as it is.
pub fn human_time(rfc3339: &str) -> String {
    let Some((date, rest)) = rfc3339.split_once('T') else { return rfc3339.to_owned() };
    let Some(clock) = rest.strip_suffix('Z') else { return rfc3339.to_owned() };
    let seconds = clock.split_once('.').map_or(clock, |(whole, _)| whole);
    format!("{date} {seconds}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_shown_to_the_second() {
        assert_eq!(human_time("2026-12-07T12:00:03.250Z"), "2026-12-07 12:00:03Z");
        assert_eq!(human_time("2026-12-07T12:00:03Z"), "2026-12-07 12:00:03Z");
        assert_eq!(human_time("2026-12-07T12:00:03Z").len(), HUMAN_TIME_WIDTH);
        assert_eq!(human_time("soon"), "soon");
    }

    #[test]
    fn cells_are_one_line_and_never_empty() {
        assert_eq!(cell(Some(&json!("a\nb")), Kind::Plain), "a b");
        assert_eq!(cell(Some(&json!("")), Kind::Plain), "-");
        assert_eq!(cell(None, Kind::Time), "-");
        assert_eq!(cell(Some(&json!(["x", "y"])), Kind::Plain), "x,y");
        assert_eq!(cell(Some(&json!({"n": 1})), Kind::Plain), r#"{"n":1}"#);
        assert_eq!(cell(Some(&json!([{"name": "code"}, {"name": "amount"}])), Kind::Names), "code,amount");
        let errors = json!([{"index": 13, "field": "amount", "reason": "not an integer"}, {"index": 41, "field": "", "reason": "bad"}]);
        assert_eq!(cell(Some(&errors), Kind::RecordErrors), "#13 amount: not an integer; #41 bad");
    }

    #[test]
    fn rows_are_aligned_under_their_header() {
        let mut out = Vec::new();
        let widths = [4, 7, 5];
        write_row(&mut out, &["ID".into(), "STATE".into(), "CAUSE".into()], &widths).unwrap();
        write_row(&mut out, &["b1".into(), "ABORTED".into(), "-".into()], &widths).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "ID    STATE    CAUSE\nb1    ABORTED  -\n");
    }
}
