package httpapi

import _ "embed"

// openapiJSON is the OpenAPI 3 description of the API, served at
// GET /v1/openapi.json.
//
//go:embed openapi.json
var openapiJSON []byte
