from mlx_intent.cli import main

main()
