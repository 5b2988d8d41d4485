//! The filter language of Query (and, later, Export): comparisons, `IN`, `IS [NOT] NULL`,
//! `AND`/`OR`/`NOT` and parentheses over an object's fields and `id`, compiled to a parameterized
//! SQL condition for SQLite or PostgreSQL. Values are always bound as parameters; field names are
//! checked against the schema (whose names are identifiers, see [`crate::schema::is_identifier`])
//! before they appear in a JSON path.
//!
//! Hand-written: the grammar is a dozen lines, and a recursive-descent parser gives errors with
//! positions that a parser-generator crate would not make clearer.
//!
//! Logic is two-valued: a comparison with a missing or null field is false, so `NOT (a > 1)`
//! matches records without `a`.

use crate::Backend;
use crate::model::{FieldType, ObjectSchema};
use crate::schema::FieldError;

/// The longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 8 * 1024;
/// The deepest nesting accepted.
const MAX_DEPTH: usize = 64;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'`
    String(String),
    /// `42`
    Integer(i64),
    /// `4.2`
    Number(f64),
    /// `true` / `false`
    Boolean(bool),
}

/// A parsed filter: its expression, and where each field name and each value is in the text, in
/// the order the compiler meets them, so that errors found while compiling say where too.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The expression.
    pub expr: Expr,
    fields_at: Vec<usize>,
    values_at: Vec<usize>,
}

/// A parsed filter's expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `a AND b`
    And(Box<Expr>, Box<Expr>),
    /// `a OR b`
    Or(Box<Expr>, Box<Expr>),
    /// `NOT a`
    Not(Box<Expr>),
    /// `field op literal`
    Cmp(String, CmpOp, Literal),
    /// `field [NOT] IN (literal, …)`
    In(String, Vec<Literal>, bool),
    /// `field IS [NOT] NULL`
    IsNull(String, bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Num(f64),
    Op(CmpOp),
    LParen,
    RParen,
    Comma,
}

fn err(pos: usize, message: impl std::fmt::Display) -> FieldError {
    FieldError::new("filter", format!("at {pos}: {message}"))
}

/// `error` (of the filter) at `pos`.
fn located(pos: usize, error: FieldError) -> FieldError {
    err(pos, error.description)
}

/// The tokens of a filter, each with its byte offset in the text.
fn tokenize(input: &str) -> Result<Vec<(usize, Tok)>, FieldError> {
    let bytes = input.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if let Some((tok, len)) = punctuation(bytes, i) {
            out.push((start, tok));
            i += len;
            continue;
        }
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'\'' => {
                let (s, end) = string_literal(input, start)?;
                out.push((start, Tok::Str(s)));
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let (number, end) = number(input, start)?;
                out.push((start, number));
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                out.push((start, Tok::Ident(input[start..i].to_owned())));
            }
            _ => {
                let ch = input[i..].chars().next().unwrap_or('?');
                return Err(err(start, format!("unexpected character {ch:?}")));
            }
        }
    }
    Ok(out)
}

/// The punctuation at `i`, if there is: a parenthesis, a comma or a comparison operator (`=`,
/// `!=`, `<>`, `<`, `<=`, `>`, `>=`); and its length.
fn punctuation(bytes: &[u8], i: usize) -> Option<(Tok, usize)> {
    Some(match (bytes[i], bytes.get(i + 1)) {
        (b'(', _) => (Tok::LParen, 1),
        (b')', _) => (Tok::RParen, 1),
        (b',', _) => (Tok::Comma, 1),
        (b'=', _) => (Tok::Op(CmpOp::Eq), 1),
        (b'!', Some(b'=')) => (Tok::Op(CmpOp::Ne), 2),
        (b'<', Some(b'=')) => (Tok::Op(CmpOp::Le), 2),
        (b'<', Some(b'>')) => (Tok::Op(CmpOp::Ne), 2),
        (b'<', _) => (Tok::Op(CmpOp::Lt), 1),
        (b'>', Some(b'=')) => (Tok::Op(CmpOp::Ge), 2),
        (b'>', _) => (Tok::Op(CmpOp::Gt), 1),
        _ => return None,
    })
}

/// The string literal whose opening quote is at `start` (a quote inside is doubled: `'it''s'`),
/// and where the text after it begins.
fn string_literal(input: &str, start: usize) -> Result<(String, usize), FieldError> {
    let mut s = String::new();
    let mut i = start + 1;
    loop {
        match input[i..].find('\'') {
            None => return Err(err(start, "unterminated string")),
            Some(end) => {
                s.push_str(&input[i..i + end]);
                i += end + 1;
                if input.as_bytes().get(i) == Some(&b'\'') {
                    s.push('\'');
                    i += 1;
                } else {
                    break;
                }
            }
        }
    }
    Ok((s, i))
}

/// The number (an integer, else a finite double) that starts at `start`, and where the text
/// after it begins.
fn number(input: &str, start: usize) -> Result<(Tok, usize), FieldError> {
    let bytes = input.as_bytes();
    let mut i = start + 1;
    while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
        // a '+' or '-' belongs to the number only right after an exponent marker
        if matches!(bytes[i], b'+' | b'-') && !matches!(bytes[i - 1], b'e' | b'E') {
            break;
        }
        i += 1;
    }
    let text = &input[start..i];
    if let Ok(n) = text.parse::<i64>() {
        Ok((Tok::Int(n), i))
    } else if let Ok(n) = text.parse::<f64>().map_err(|_| ()).and_then(|n| if n.is_finite() { Ok(n) } else { Err(()) })
    {
        Ok((Tok::Num(n), i))
    } else {
        Err(err(start, format!("invalid number {text:?}")))
    }
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    end: usize,
    depth: usize,
    fields_at: Vec<usize>,
    values_at: Vec<usize>,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |(p, _)| *p)
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        let yes = self.keyword(kw);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn expect(&mut self, tok: Tok, what: &str) -> Result<(), FieldError> {
        if self.peek() == Some(&tok) {
            self.pos += 1;
            Ok(())
        } else {
            Err(err(self.at(), format!("expected {what}")))
        }
    }

    fn or(&mut self) -> Result<Expr, FieldError> {
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, FieldError> {
        let mut left = self.not()?;
        while self.eat_keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, FieldError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(err(self.at(), format!("nested deeper than {MAX_DEPTH}")));
        }
        let result = if self.eat_keyword("NOT") { self.not().map(|e| Expr::Not(Box::new(e))) } else { self.primary() };
        self.depth -= 1;
        result
    }

    fn primary(&mut self) -> Result<Expr, FieldError> {
        let at = self.at();
        match self.peek().cloned() {
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.or()?;
                self.expect(Tok::RParen, "`)`")?;
                Ok(e)
            }
            Some(Tok::Ident(name)) if !is_keyword(&name) => {
                self.pos += 1;
                self.fields_at.push(at);
                self.condition(name)
            }
            Some(_) => Err(err(at, "expected a field name, `NOT` or `(`")),
            None => Err(err(at, "unexpected end of filter")),
        }
    }

    fn condition(&mut self, field: String) -> Result<Expr, FieldError> {
        let at = self.at();
        if let Some(Tok::Op(op)) = self.peek().cloned() {
            self.pos += 1;
            return Ok(Expr::Cmp(field, op, self.literal()?));
        }
        if self.eat_keyword("IS") {
            let negated = self.eat_keyword("NOT");
            if !self.eat_keyword("NULL") {
                return Err(err(self.at(), "expected `NULL`"));
            }
            return Ok(Expr::IsNull(field, negated));
        }
        let negated = self.eat_keyword("NOT");
        if self.eat_keyword("IN") {
            self.expect(Tok::LParen, "`(` after IN")?;
            let mut values = vec![self.literal()?];
            while self.peek() == Some(&Tok::Comma) {
                self.pos += 1;
                values.push(self.literal()?);
            }
            self.expect(Tok::RParen, "`)` closing the IN list")?;
            return Ok(Expr::In(field, values, negated));
        }
        Err(err(at, format!("expected a comparison, IN or IS after {field:?}")))
    }

    fn literal(&mut self) -> Result<Literal, FieldError> {
        let at = self.at();
        let lit = match self.peek().cloned() {
            Some(Tok::Str(s)) => Literal::String(s),
            Some(Tok::Int(n)) => Literal::Integer(n),
            Some(Tok::Num(n)) => Literal::Number(n),
            Some(Tok::Ident(s)) if s.eq_ignore_ascii_case("true") => Literal::Boolean(true),
            Some(Tok::Ident(s)) if s.eq_ignore_ascii_case("false") => Literal::Boolean(false),
            _ => return Err(err(at, "expected a value: 'text', a number, true or false")),
        };
        self.pos += 1;
        self.values_at.push(at);
        Ok(lit)
    }
}

fn is_keyword(s: &str) -> bool {
    ["AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE"].iter().any(|k| s.eq_ignore_ascii_case(k))
}

/// Parses a filter. An empty (or blank) filter is `None`: every record.
pub fn parse(input: &str) -> Result<Option<Filter>, FieldError> {
    if input.len() > MAX_FILTER_LEN {
        return Err(err(MAX_FILTER_LEN, format!("longer than {MAX_FILTER_LEN} bytes")));
    }
    let toks = tokenize(input)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut parser = Parser { toks, pos: 0, end: input.len(), depth: 0, fields_at: Vec::new(), values_at: Vec::new() };
    let expr = parser.or()?;
    if parser.pos < parser.toks.len() {
        return Err(err(parser.at(), "unexpected input after the end of the condition"));
    }
    Ok(Some(Filter { expr, fields_at: parser.fields_at, values_at: parser.values_at }))
}

/// A value bound to a compiled filter's placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// TEXT
    Text(String),
    /// BIGINT / INTEGER
    Int(i64),
    /// DOUBLE PRECISION / REAL
    Real(f64),
    /// BOOLEAN (bound as 0/1 on SQLite)
    Bool(bool),
}

/// A filter compiled to SQL: a condition using `$first..` placeholders, and their values.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// The condition, to AND into a WHERE clause over `records`.
    pub sql: String,
    /// The values of its placeholders, in order.
    pub params: Vec<Param>,
}

struct Compiler<'a> {
    schema: &'a ObjectSchema,
    backend: Backend,
    next: usize,
    params: Vec<Param>,
    /// Where the field names and values met so far are in the text, and how many were met.
    fields_at: std::slice::Iter<'a, usize>,
    values_at: std::slice::Iter<'a, usize>,
}

impl Compiler<'_> {
    /// The position of the next field name (in the order of [`Compiler::compile`]).
    fn field_at(&mut self) -> usize {
        self.fields_at.next().copied().unwrap_or_default()
    }

    /// The position of the next value.
    fn value_at(&mut self) -> usize {
        self.values_at.next().copied().unwrap_or_default()
    }

    fn column(&self, field: &str) -> Result<(String, Option<FieldType>), FieldError> {
        if field == "id" {
            return Ok(("id".to_owned(), None));
        }
        let spec = self.schema.field(field).ok_or_else(|| {
            FieldError::new("filter", format!("unknown field {field:?} of object {}", self.schema.name))
        })?;
        // Safe to splice: schema field names are identifiers (a-z, 0-9, _).
        let column = match (self.backend, spec.field_type) {
            (Backend::Sqlite, _) => format!("json_extract(fields, '$.{field}')"),
            (Backend::Postgres, FieldType::String | FieldType::Decimal) => format!("(fields->>'{field}')"),
            (Backend::Postgres, FieldType::Integer) => format!("((fields->>'{field}')::bigint)"),
            (Backend::Postgres, FieldType::Number) => format!("((fields->>'{field}')::double precision)"),
            (Backend::Postgres, FieldType::Boolean) => format!("((fields->>'{field}')::boolean)"),
        };
        Ok((column, Some(spec.field_type)))
    }

    fn bind(&mut self, field: &str, ty: Option<FieldType>, lit: &Literal) -> Result<String, FieldError> {
        let param = match (ty, lit) {
            (None | Some(FieldType::String), Literal::String(s)) => Param::Text(s.clone()),
            (Some(FieldType::Integer), Literal::Integer(n)) => Param::Int(*n),
            (Some(FieldType::Number), Literal::Integer(n)) => Param::Real(*n as f64),
            (Some(FieldType::Number), Literal::Number(n)) => Param::Real(*n),
            // decimals are stored as canonical text, so equal decimals have equal text
            (Some(FieldType::Decimal), Literal::String(s)) => Param::Text(
                crate::schema::canonical_decimal(s)
                    .map_err(|e| FieldError::new("filter", format!("field {field:?} is decimal: {e}")))?,
            ),
            (Some(FieldType::Decimal), Literal::Integer(n)) => Param::Text(n.to_string()),
            (Some(FieldType::Boolean), Literal::Boolean(b)) => match self.backend {
                Backend::Sqlite => Param::Int(i64::from(*b)),
                Backend::Postgres => Param::Bool(*b),
            },
            (Some(FieldType::Integer), Literal::Number(n)) if n.fract() == 0.0 => {
                return Err(FieldError::new(
                    "filter",
                    format!("{n} is out of range for integer field {field:?} (signed 64-bit)"),
                ));
            }
            (ty, lit) => {
                let expected = ty.map_or("string", FieldType::name);
                return Err(FieldError::new(
                    "filter",
                    format!("field {field:?} is {expected}, compared with {}", literal_kind(lit)),
                ));
            }
        };
        self.params.push(param);
        let placeholder = format!("${}", self.next);
        self.next += 1;
        Ok(placeholder)
    }

    fn falsy(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "0",
            Backend::Postgres => "FALSE",
        }
    }

    fn compile(&mut self, expr: &Expr) -> Result<String, FieldError> {
        Ok(match expr {
            Expr::And(a, b) => format!("({} AND {})", self.compile(a)?, self.compile(b)?),
            Expr::Or(a, b) => format!("({} OR {})", self.compile(a)?, self.compile(b)?),
            Expr::Not(a) => format!("(NOT {})", self.compile(a)?),
            Expr::Cmp(field, op, lit) => {
                let at = self.field_at();
                let (column, ty) = self.column(field).map_err(|e| located(at, e))?;
                if ty == Some(FieldType::Decimal) && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                    return Err(located(
                        at,
                        FieldError::new(
                            "filter",
                            format!(
                                "field {field:?} is decimal: it takes =, !=, IN and IS NULL; {} is not supported on \
                                 decimals",
                                op.sql()
                            ),
                        ),
                    ));
                }
                let at = self.value_at();
                let p = self.bind(field, ty, lit).map_err(|e| located(at, e))?;
                format!("COALESCE({column} {} {p}, {})", op.sql(), self.falsy())
            }
            Expr::In(field, values, negated) => {
                let at = self.field_at();
                let (column, ty) = self.column(field).map_err(|e| located(at, e))?;
                let list = values
                    .iter()
                    .map(|v| {
                        let at = self.value_at();
                        self.bind(field, ty, v).map_err(|e| located(at, e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let not = if *negated { "NOT " } else { "" };
                format!("COALESCE({column} {not}IN ({}), {})", list.join(", "), self.falsy())
            }
            Expr::IsNull(field, negated) => {
                let at = self.field_at();
                let (column, _) = self.column(field).map_err(|e| located(at, e))?;
                format!("({column} IS {}NULL)", if *negated { "NOT " } else { "" })
            }
        })
    }
}

fn literal_kind(lit: &Literal) -> &'static str {
    match lit {
        Literal::String(_) => "a string",
        Literal::Integer(_) => "an integer",
        Literal::Number(_) => "a number",
        Literal::Boolean(_) => "a boolean",
    }
}

/// Compiles a parsed filter for `backend`, numbering placeholders from `$first`.
pub fn compile(filter: &Filter, schema: &ObjectSchema, backend: Backend, first: usize) -> Result<Compiled, FieldError> {
    let mut c = Compiler {
        schema,
        backend,
        next: first,
        params: Vec::new(),
        fields_at: filter.fields_at.iter(),
        values_at: filter.values_at.iter(),
    };
    let sql = c.compile(&filter.expr)?;
    Ok(Compiled { sql, params: c.params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FieldSpec;

    fn schema() -> ObjectSchema {
        let f = |name: &str, field_type| FieldSpec {
            name: name.into(),
            field_type,
            required: false,
            unique: false,
            deprecated: false,
        };
        ObjectSchema {
            name: "account".into(),
            external_id_field: "code".into(),
            fields: vec![
                f("code", FieldType::String),
                f("amount", FieldType::Integer),
                f("score", FieldType::Number),
                f("active", FieldType::Boolean),
            ],
            dropped_fields: vec![],
            version: 1,
        }
    }

    #[test]
    fn parses_precedence_and_keywords_case_insensitively() {
        let e = parse("a = 1 or b = 2 AND not c is null").unwrap().unwrap().expr;
        let expected = Expr::Or(
            Box::new(Expr::Cmp("a".into(), CmpOp::Eq, Literal::Integer(1))),
            Box::new(Expr::And(
                Box::new(Expr::Cmp("b".into(), CmpOp::Eq, Literal::Integer(2))),
                Box::new(Expr::Not(Box::new(Expr::IsNull("c".into(), false)))),
            )),
        );
        assert_eq!(e, expected);
        assert_eq!(parse("  ").unwrap(), None);
        assert_eq!(
            parse("code = 'it''s'").unwrap().unwrap().expr,
            Expr::Cmp("code".into(), CmpOp::Eq, Literal::String("it's".into()))
        );
        assert_eq!(
            parse("x NOT IN (1, -2.5e1)").unwrap().unwrap().expr,
            Expr::In("x".into(), vec![Literal::Integer(1), Literal::Number(-25.0)], true)
        );
    }

    #[test]
    fn malformed_filters_say_where() {
        for (input, fragment) in [
            ("amount >", "at 8: expected a value"),
            ("(amount > 1", "at 11: expected `)`"),
            ("amount > 1 amount", "at 11: unexpected input"),
            ("code = 'open", "at 7: unterminated string"),
            ("amount ~ 1", "at 7: unexpected character '~'"),
            ("AND", "at 0: expected a field name"),
            ("amount IS 3", "expected `NULL`"),
        ] {
            let e = parse(input).unwrap_err();
            assert_eq!(e.field, "filter");
            assert!(e.description.contains(fragment), "{input}: {}", e.description);
        }
        let deep = format!("{}a = 1{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&deep).unwrap_err().description.contains("nested deeper"));
    }

    #[test]
    fn compiles_to_placeholders_never_values() {
        let e =
            parse("code IN ('a''; drop table records; --', 'b') AND amount >= 10 OR active = true").unwrap().unwrap();
        let c = compile(&e, &schema(), Backend::Sqlite, 3).unwrap();
        assert_eq!(
            c.sql,
            "((COALESCE(json_extract(fields, '$.code') IN ($3, $4), 0) AND COALESCE(json_extract(fields, '$.amount') >= $5, 0)) OR COALESCE(json_extract(fields, '$.active') = $6, 0))"
        );
        assert_eq!(c.params[0], Param::Text("a'; drop table records; --".into()));
        assert_eq!(c.params[3], Param::Int(1));
        let pg = compile(&e, &schema(), Backend::Postgres, 1).unwrap();
        assert!(pg.sql.contains("((fields->>'amount')::bigint) >= $3"), "{}", pg.sql);
        assert_eq!(pg.params[3], Param::Bool(true));
    }

    #[test]
    fn not_equal_has_two_spellings() {
        assert_eq!(parse("amount <> 5").unwrap(), parse("amount != 5").unwrap());
        let e = parse("amount <> 5").unwrap().unwrap();
        assert_eq!(e.expr, Expr::Cmp("amount".into(), CmpOp::Ne, Literal::Integer(5)));
        assert!(compile(&e, &schema(), Backend::Sqlite, 1).unwrap().sql.contains("<> $1"));
    }

    #[test]
    fn every_error_says_where() {
        let s = schema();
        for (input, expected) in [
            ("colour = 'red'", "at 0: unknown field \"colour\" of object account"),
            ("amount = 1 AND colour IS NULL", "at 15: unknown field \"colour\" of object account"),
            ("code = 'a' OR colour IN (1)", "at 14: unknown field \"colour\" of object account"),
            ("amount = 'ten'", "at 9: field \"amount\" is integer, compared with a string"),
            ("code = 'a' AND amount IN (1, 2, 'three')", "at 32: field \"amount\" is integer, compared with a string"),
            (
                "amount > 9300000000000000000",
                "at 9: 9300000000000000000 is out of range for integer field \"amount\" (signed 64-bit)",
            ),
            ("amount = 1.5", "at 9: field \"amount\" is integer, compared with a number"),
        ] {
            let e = parse(input).unwrap().unwrap();
            assert_eq!(compile(&e, &s, Backend::Sqlite, 1).unwrap_err().description, expected, "{input}");
        }
        for input in ["amount > 1e400", "amount ~ 1", &"x".repeat(MAX_FILTER_LEN + 1)] {
            let e = parse(input).unwrap_err();
            assert!(e.description.starts_with("at "), "{input}: {}", e.description);
        }
    }

    #[test]
    fn unknown_fields_and_type_mismatches_are_rejected() {
        let s = schema();
        let e = parse("colour = 'red'").unwrap().unwrap();
        assert!(compile(&e, &s, Backend::Sqlite, 1).unwrap_err().description.contains("unknown field \"colour\""));
        let e = parse("amount = 'ten'").unwrap().unwrap();
        assert_eq!(
            compile(&e, &s, Backend::Sqlite, 1).unwrap_err().description,
            "at 9: field \"amount\" is integer, compared with a string"
        );
        let e = parse("score > 1 AND id = 'x'").unwrap().unwrap();
        let c = compile(&e, &s, Backend::Sqlite, 1).unwrap();
        assert_eq!(c.params, vec![Param::Real(1.0), Param::Text("x".into())]);
    }

    #[test]
    fn decimals_compare_by_canonical_text_and_refuse_ordering() {
        let mut s = schema();
        s.fields.push(FieldSpec {
            name: "price".into(),
            field_type: FieldType::Decimal,
            required: false,
            unique: false,
            deprecated: false,
        });
        let e = parse("price = '012.50' OR price IN (7, '-0')").unwrap().unwrap();
        let c = compile(&e, &s, Backend::Postgres, 1).unwrap();
        assert_eq!(c.params, vec![Param::Text("12.5".into()), Param::Text("7".into()), Param::Text("0".into())]);
        let e = parse("price > '1'").unwrap().unwrap();
        assert!(
            compile(&e, &s, Backend::Sqlite, 1).unwrap_err().description.contains("> is not supported on decimals")
        );
        let e = parse("price = 1.5").unwrap().unwrap();
        assert_eq!(
            compile(&e, &s, Backend::Sqlite, 1).unwrap_err().description,
            "at 8: field \"price\" is decimal, compared with a number"
        );
        let e = parse("price = '1e3'").unwrap().unwrap();
        assert!(compile(&e, &s, Backend::Sqlite, 1).unwrap_err().description.contains("not decimal text"));
    }
}
