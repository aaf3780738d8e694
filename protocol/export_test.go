package protocol

// KeyMayFold is keyMayFold, for the fuzz targets.
var KeyMayFold = keyMayFold

// DropForeign clears v's foreign fields as Decode does (foreignFields),
// for the fuzz targets; v of another type is left as it is.
func DropForeign(v any) {
	if f, ok := v.(foreignFields); ok {
		f.dropForeign()
	}
}
