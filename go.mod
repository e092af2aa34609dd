module github.com/vscard/vscard

go 1.26.8
