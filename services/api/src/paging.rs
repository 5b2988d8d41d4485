//! Pages of the lists ordered by creation time and id (ListBatches, ListExports, ListApiKeys):
//! the page size a request asks for, and the page token on the wire.
//!
//! A page token names the last item of the page before, by its creation time and id
//! (`MS:ID`), so a page follows its predecessor exactly even while items are added: keyset
//! paging, never an offset. Clients treat it as opaque.

use baton_store::FieldError;
use baton_store::model::Cursor;

use crate::Error;

/// Items per page when a request leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most items per page.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// The page size a request asked for (0: the default); INVALID_ARGUMENT over the maximum.
pub fn page_size(requested: u32) -> Result<u32, Error> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => {
            Err(Error::Invalid(vec![FieldError::new("page_size", format!("at most {MAX_PAGE_SIZE}, got {n}"))]))
        }
        n => Ok(n),
    }
}

/// Where the page a token asks for starts (`None`: the first page); INVALID_ARGUMENT for a
/// token no list answered.
pub fn cursor_of(token: &str) -> Result<Option<Cursor>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::Invalid(vec![FieldError::new("page_token", "not a token this RPC answered")]);
    let (ms, id) = token.split_once(':').ok_or_else(bad)?;
    let created_at_ms = ms.parse().map_err(|_| bad())?;
    if id.is_empty() {
        return Err(bad());
    }
    Ok(Some(Cursor { created_at_ms, id: id.to_owned() }))
}

/// One page of `items`, read with a limit of `size + 1` (the one more tells whether another
/// page follows), and the token of the next page (empty on the last page).
pub fn page<T>(mut items: Vec<T>, size: u32, cursor: impl Fn(&T) -> Cursor) -> (Vec<T>, String) {
    if items.len() <= size as usize {
        return (items, String::new());
    }
    items.truncate(size as usize);
    let next = items.last().map(|last| {
        let c = cursor(last);
        format!("{}:{}", c.created_at_ms, c.id)
    });
    (items, next.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64, id: &str) -> Cursor {
        Cursor { created_at_ms: ms, id: id.to_owned() }
    }

    #[test]
    fn a_token_names_the_last_item_of_its_page() {
        let items = vec![at(5, "bat_c"), at(5, "bat_b"), at(3, "bat_a")];
        let (first, token) = page(items.clone(), 2, Clone::clone);
        assert_eq!((first.len(), token.as_str()), (2, "5:bat_b"));
        assert_eq!(cursor_of(&token).unwrap(), Some(at(5, "bat_b")));
        let (all, token) = page(items, 3, Clone::clone);
        assert_eq!((all.len(), token.as_str()), (3, ""));
        assert_eq!(cursor_of("").unwrap(), None);
    }

    #[test]
    fn made_up_tokens_and_sizes_are_invalid_arguments() {
        for token in ["x", "5", "5:", "five:bat_a"] {
            assert!(matches!(cursor_of(token), Err(Error::Invalid(_))), "{token}");
        }
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert!(matches!(page_size(MAX_PAGE_SIZE + 1), Err(Error::Invalid(_))));
    }
}
