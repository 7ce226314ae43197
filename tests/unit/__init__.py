"""Millisecond tests of the pure stages, beside the end-to-end tests one level up (a package so that a file here may
share its basename with one there)."""
