"""The `microdit` command line: the local stack's process supervision (`stack`), submitting and following flow
runs (`follow`, `watch`), and the commands themselves (`main`). Nothing in pipeline/ or flows/ imports it."""
