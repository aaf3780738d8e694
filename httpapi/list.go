package httpapi

import (
	"context"
	"net/http"
)

// listPage answers a paged list request: it reads limit and after
// (pageParams, so a bad limit is a 400 before anything else), fetches up to
// limit items after the cursor and answers them in the List envelope, whose
// next cursor is the last item's key (cursor) when the page is full. fetch
// may read the rest of the request (filters); its error is the handler's.
func listPage[T any](w http.ResponseWriter, r *http.Request, fetch func(ctx context.Context, after string, limit int) ([]T, error), cursor func(T) string) error {
	limit, after, err := pageParams(r)
	if err != nil {
		return err
	}
	items, err := fetch(r.Context(), after, limit)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, listOf(items, limit, cursor))
	return nil
}
